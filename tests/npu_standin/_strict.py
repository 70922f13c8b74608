"""Device-strict tensors for the stand-ins: "npu" (or "cuda") tensors that are not interchangeable with host ones.

Mechanism: a ``TorchFunctionMode`` that tags device tensors.  A device tensor is an ordinary CPU tensor whose
storage carries a tag (``_standin_device``); the tag lives on the storage, so views, ``nn.Parameter`` and
``.data`` of a device tensor are device tensors too, and it disappears with the storage.  Under the mode:

* creation with ``device=<the device>`` (also through ``with torch.device(...)``), ``.to(device)``, ``.npu()`` /
  ``.cuda()``, ``.pin_memory()`` and every op with a device tensor among its inputs give device tensors;
  ``tensor.device`` reports ``npu:N`` / ``cuda:N`` for them, so code that asks a tensor for its device works;
* an op mixing a device tensor with a host tensor of one or more dimensions raises
  ``RuntimeError("Expected all tensors to be on the same device ...")`` as torch does on hardware (0-dim host
  tensors are allowed, as torch allows them; host index tensors in ``t[idx]`` / ``t[idx] = v`` /
  ``index_put_`` are allowed, as torch copies them); so does a device tensor combined with another device's;
* ``.cpu()`` / ``.to("cpu")``, ``.tolist()``, ``.item()`` (and ``int()``/``float()``/``bool()``) are the ways
  back; ``.numpy()`` of a device tensor raises as torch's does ("use Tensor.cpu() first");
* a ``non_blocking=True`` host-to-device copy from memory that is not pinned is reported (``StrictDevice.
  unpinned_copies``; raised at once when ``raise_on_unpinned``): torch_npu queues such a copy asynchronously
  and the host buffer may be reused before it is read;
* ``torch.Generator(device=<the device>)`` gives a device generator; drawing into a device tensor with a host
  generator (or the reverse) raises, as it does on hardware;
* memory: every device storage counts as allocated while it lives; a caching allocator's reserved pool grows
  to the allocated peak (rounded to 2 MiB blocks) and shrinks only on ``empty_cache()``; ``mem_get_info`` reports
  ``total - reserved - other`` (``other``: what the runtime holds outside the allocator, e.g. HCCL buffers).

What it cannot catch: anything that does not pass through torch's Python-level function dispatch (C++ code
inside one op, ``torch.distributed`` collectives, custom ops called through ``torch.ops`` with tensors the mode
never saw), stream ordering and real asynchrony (every op runs synchronously on the CPU), numerics and
performance of the device, or a mix that only happens in threads started before :func:`StrictDevice.enter`
(the mode is per thread; threads started afterwards enter it themselves).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

TAG = "_standin_device"
ACTIVE: StrictDevice | None = None  # the strict device entered in this process, if any
PINNED = "_standin_pinned"
BLOCK = 2 << 20  # the caching allocator's rounding


def device_of(t: torch.Tensor) -> torch.device | None:
    """The stand-in device a tensor lives on, or None for a host tensor."""
    try:
        return getattr(t.untyped_storage(), TAG, None)
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return None


def _is_pinned(t: torch.Tensor) -> bool:
    return bool(getattr(t.untyped_storage(), PINNED, False))


class Memory:
    """Allocated / reserved / peak bytes of one stand-in device, as a caching allocator keeps them."""

    def __init__(self, total: int = 64 << 30, other: int = 0):
        self.total, self.other = total, other
        self.allocated = self.reserved = self.peak = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> None:
        with self._lock:
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
            rounded = -(-self.allocated // BLOCK) * BLOCK
            self.reserved = max(self.reserved, rounded)

    def free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated -= nbytes

    def empty_cache(self) -> None:
        with self._lock:
            self.reserved = -(-self.allocated // BLOCK) * BLOCK

    def mem_get_info(self) -> tuple[int, int]:
        return max(self.total - self.reserved - self.other, 0), self.total

    def reset_peak(self) -> None:
        self.peak = self.allocated


class StrictDevice:
    """The process-wide state of one strict stand-in device type ("npu" or "cuda")."""

    def __init__(self, device_type: str, raise_on_unpinned: bool = False):
        if device_type == "npu" and torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")  # what torch_npu does: makes "npu:0" a device string
        self.device_type = device_type
        self.raise_on_unpinned = raise_on_unpinned
        self.unpinned_copies: list[str] = []
        self.memory = Memory()
        self._modes: dict[int, _Mode] = {}
        self._thread_run = None
        self._generator = None

    # ------------------------------------------------------------------ tagging
    def tag(self, t: torch.Tensor, device: torch.device, pinned: bool = False) -> torch.Tensor:
        storage = t.untyped_storage()
        if getattr(storage, TAG, None) is None and not getattr(storage, PINNED, False):
            nbytes = storage.nbytes()
            if not pinned:
                self.memory.alloc(nbytes)
                weakref.finalize(storage, self.memory.free, nbytes)
        if pinned:
            setattr(storage, PINNED, True)
        else:
            setattr(storage, TAG, device)
        return t

    def tensor(self, t: torch.Tensor, index: int = 0) -> torch.Tensor:
        """A device copy of host tensor ``t`` (for tests that build device inputs by hand)."""
        return self.tag(t.detach().clone(), torch.device(self.device_type, index))

    # ------------------------------------------------------------------ threads
    def enter(self) -> None:
        """Enter the mode in this thread and in every thread started from now on."""
        global ACTIVE
        ACTIVE = self
        self._enter_thread()
        if self._thread_run is None:
            run, strict = threading.Thread.run, self

            def run_strict(thread):
                strict._enter_thread()
                try:
                    run(thread)
                finally:
                    strict._exit_thread()
            self._thread_run = run
            threading.Thread.run = run_strict
        if self._generator is None:
            self._generator = torch.Generator
            torch.Generator = _generator_class(self)

    def exit(self) -> None:
        global ACTIVE
        if ACTIVE is self:
            ACTIVE = None
        for ident in list(self._modes):
            if ident == threading.get_ident():
                self._exit_thread()
        if self._thread_run is not None:
            threading.Thread.run = self._thread_run
            self._thread_run = None
        if self._generator is not None:
            torch.Generator = self._generator
            self._generator = None

    def _enter_thread(self) -> None:
        ident = threading.get_ident()
        if ident not in self._modes:
            mode = _Mode(self)
            mode.__enter__()
            self._modes[ident] = mode

    def _exit_thread(self) -> None:
        mode = self._modes.pop(threading.get_ident(), None)
        if mode is not None:
            mode.__exit__(None, None, None)

    # ------------------------------------------------------------------ checks
    def report_unpinned(self, what: str) -> None:
        msg = (f"non_blocking=True copy of an unpinned host tensor to {self.device_type} ({what}): the host buffer "
               "may be freed or reused before the asynchronous copy reads it; copy from pinned memory")
        self.unpinned_copies.append(msg)
        if self.raise_on_unpinned:
            raise RuntimeError(msg)

    def is_device(self, device) -> bool:
        if device is None or isinstance(device, torch.Tensor):
            return False
        if isinstance(device, int):
            return False  # torch reads a bare int as the current accelerator; npu_infer never passes one
        return torch.device(device).type == self.device_type

    def canonical(self, device) -> torch.device:
        device = torch.device(device)
        return torch.device(device.type, 0 if device.index is None else device.index)


def _generator_class(strict: StrictDevice):
    base = strict._generator

    class Generator(base):
        """torch.Generator that also builds generators for the stand-in device (a host generator tagged)."""

        def __new__(cls, device="cpu"):
            if strict.is_device(device):
                gen = base.__new__(cls)
                gen._standin_device = strict.canonical(device)
                return gen
            return base.__new__(cls, device)

        def __init__(self, device="cpu"):
            pass

        @property
        def device(self):
            return getattr(self, "_standin_device", None) or base.device.__get__(self)
    return Generator


_WAY_BACK = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put,
             torch.index_put}
_COPIES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.pin_memory,
           torch.Tensor.is_pinned, torch.Tensor.numpy}
_PROPS = {torch.Tensor.device.__get__: "device", torch.Tensor.is_cpu.__get__: "is_cpu",
          torch.Tensor.is_cuda.__get__: "is_cuda"}


def _target_device(args, kwargs):
    """The device a ``.to(...)`` call moves to, or None for a dtype-only conversion."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return a
        if isinstance(a, torch.Tensor):
            return device_of(a) or torch.device("cpu")
    return None


class _Mode(TorchFunctionMode):
    def __init__(self, strict: StrictDevice):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        strict = self.strict
        prop = _PROPS.get(func)
        if prop is not None:
            dev = device_of(args[0])
            if dev is None:
                return func(*args, **kwargs)
            return dev if prop == "device" else (prop == "is_cuda" and dev.type == "cuda")
        if func in _COPIES:
            return self._copy(func, args, kwargs)
        if func in _WAY_BACK:
            return func(*args, **kwargs)
        new_device = kwargs.get("device")
        pin = kwargs.get("pin_memory", False)
        if strict.is_device(new_device) or pin:
            kwargs = dict(kwargs)
            if strict.is_device(new_device):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        devices = {device_of(t) for t in tensors}
        devices.discard(None)
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{' and '.join(sorted(map(str, devices)))}! (strict stand-in, {_name(func)})")
        target = strict.canonical(new_device) if strict.is_device(new_device) else next(iter(devices), None)
        if devices and func not in _INDEXING:
            host = [t for t in tensors if device_of(t) is None and t.dim() > 0]
            if host:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{target} and cpu! (strict stand-in, {_name(func)}: a host tensor of shape "
                                   f"{tuple(host[0].shape)} mixed with {target} tensors)")
        generator = kwargs.get("generator")
        if generator is not None and tensors:
            gen_device = getattr(generator, "_standin_device", None)
            if gen_device != target and not (gen_device is None and target is None):
                raise RuntimeError(f"Expected a '{(target or torch.device('cpu')).type}' device type for generator "
                                   f"but found '{(gen_device or torch.device('cpu')).type}' (strict stand-in)")
        out = func(*args, **kwargs)
        if target is not None or pin:
            def tag(x):
                if isinstance(x, torch.Tensor) and device_of(x) is None:
                    strict.tag(x, target, pinned=target is None)
                return x
            tree_map(tag, out)
        return out

    def _copy(self, func, args, kwargs):
        strict, src = self.strict, args[0]
        src_device = device_of(src)
        if func is torch.Tensor.is_pinned:
            return src_device is None and _is_pinned(src)
        if func is torch.Tensor.numpy:
            if src_device is not None:
                raise TypeError(f"can't convert {src_device} device type tensor to numpy. Use Tensor.cpu() to "
                                "copy the tensor to host memory first. (strict stand-in)")
            return func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            if src_device is not None:
                raise RuntimeError(f"cannot pin '{src_device}' memory: only dense CPU tensors can be pinned")
            return strict.tag(src.detach().clone(), None, pinned=True)
        if func is torch.Tensor.copy_:
            dst, source = args[0], args[1]
            if device_of(dst) is not None and device_of(source) is None and source.dim() > 0:
                self._check_pinned(source, args[2] if len(args) > 2 else kwargs.get("non_blocking", False), "copy_")
            return func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            return src.detach().clone() if src_device is not None else src
        if func is torch.Tensor.cuda:
            target = torch.device("cuda", args[1] if len(args) > 1 and isinstance(args[1], int) else 0)
            non_blocking = kwargs.get("non_blocking", False)
        else:  # Tensor.to
            target = _target_device(args, kwargs)
            non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
        if target is None:  # dtype only: stays where it is
            out = func(*args, **kwargs)
            return strict.tag(out, src_device) if src_device is not None and device_of(out) is None else out
        if not strict.is_device(target):
            if torch.device(target).type != "cpu":
                raise RuntimeError(f"strict stand-in for {strict.device_type} cannot move a tensor to {target}")
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            rest = [a for a in args[1:] if not isinstance(a, (torch.device, str, torch.Tensor))]
            out = func(src, *rest, **kwargs) if rest or kwargs else src
            return out.detach().clone() if src_device is not None and out.untyped_storage() is src.untyped_storage() \
                else out
        target = strict.canonical(target)
        if src_device is not None and src_device != target:
            raise RuntimeError(f"strict stand-in has one device per process, not {src_device} and {target}")
        if src_device is None and non_blocking:
            self._check_pinned(src, True, "to")
        dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
        out = src if dtype is None else src.to(dtype)
        if src_device is None:
            out = strict.tag(out.clone() if out.untyped_storage() is src.untyped_storage() else out, target)
        elif device_of(out) is None:
            strict.tag(out, target)
        return out

    def _check_pinned(self, src: torch.Tensor, non_blocking: bool, what: str) -> None:
        if non_blocking and not _is_pinned(src):
            self.strict.report_unpinned(f"{what} of a host tensor of shape {tuple(src.shape)}")


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
