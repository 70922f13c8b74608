"""`npu-infer worker`: start the ranks of one node other than node 0 of a multi-node run, with the server's
engine flags (engine_args.py), and wait for them."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from multiprocessing.connection import wait

from npu_infer.config import EngineConfig
from npu_infer.engine_args import add_engine_args, engine_config_kwargs
from npu_infer.engine.startup import resolve_engine_config
from npu_infer.worker.parallel_layout import check_parallel_config, ranks_of_node, rendezvous_address
from npu_infer.worker.watchdog import describe_exit
from npu_infer.worker.worker_process import for_workers, spawn_workers, stop_workers

logger = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npu-infer worker", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run the tensor/pipeline-parallel ranks of one node other than node 0. Pass the same model "
                    "and parallel flags as the server on node 0, plus --nnodes, --node-rank, --master-addr "
                    "(node 0's address) and --master-port. Server-only flags are ignored.")
    add_engine_args(parser)
    return parser


def worker_main(argv: list[str]) -> int:
    """Start this node's ranks and wait for them; exit non-zero when one of them fails."""
    parser = make_parser()
    args, ignored = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ignored:
        logger.info("ignoring server-only arguments: %s", " ".join(ignored))
    if args.model is None:
        parser.error("pass --model, the same model as the server's on node 0")
    config = EngineConfig(**engine_config_kwargs(args))
    if config.nnodes < 2 or config.node_rank < 1:
        raise SystemExit("npu-infer worker runs the ranks of node 1.. of a multi-node run: pass --nnodes N (>= 2) "
                         "and --node-rank K (1 <= K < N); node 0 runs the server")
    resolve_engine_config(config)  # as LLMEngine resolves it on node 0 (the ranks then check that the results agree)
    check_parallel_config(config)
    ranks, rendezvous = ranks_of_node(config, config.node_rank), rendezvous_address(config)
    logger.info("node %d: starting ranks %d..%d, rendezvous at %s", config.node_rank, ranks[0], ranks[-1], rendezvous)
    procs, _ = spawn_workers(for_workers(config), config.node_rank, rendezvous, with_pipes=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        pending = {p.sentinel: p for p in procs}
        while pending:
            for sentinel in wait(list(pending)):
                proc = pending.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    logger.error("%s %s; stopping this node's other ranks", proc.name, describe_exit(proc))
                    return 1
        return 0
    finally:
        stop_workers(procs, [], graceful=False)
