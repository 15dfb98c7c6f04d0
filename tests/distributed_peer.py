"""A rank of a 2-process gloo job for ``test_distributed``: run as ``python distributed_peer.py
RANK PORT TIMEOUT_S MODE``.

- ``hung`` / ``dead``: both ranks all-reduce once together; then rank 1 hangs or exits and rank 0
  prints, as one JSON line, what its next all-reduce raised and after how many seconds.
- ``average``: each rank sets rank-dependent gradients (one parameter has a gradient on rank 1
  only, one on neither) and a buffer, averages them, and prints the results as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def main(rank: int, port: int, timeout_s: float, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from evolsplat_ns.engine import distributed

    d = distributed.setup("cpu", timeout_s)
    if mode == "average":
        print(json.dumps(average(d, rank)), flush=True)
        return
    d.all_reduce_sum(torch.ones(2), "warm-up")
    if rank == 1:
        if mode == "dead":
            os._exit(3)
        time.sleep(timeout_s * 6)
        os._exit(0)
    start = time.monotonic()
    try:
        d.all_reduce_sum(torch.ones(2), "the gradient all-reduce of step 7")
        result = {"message": "no error", "waited": 0.0}
    except distributed.RankFailureError as e:
        result = {"message": str(e), "waited": time.monotonic() - start}
    print(json.dumps(result), flush=True)
    os._exit(0)  # no process-group teardown: its peer is gone


def average(d, rank: int) -> dict:
    both, rank1_only, neither = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(rank + 1))
    rank1_only.grad = torch.full((3,), 4.0) if rank == 1 else None
    buffer = torch.tensor([2.0 * rank])
    d.average_gradients([both, rank1_only, neither], [buffer, torch.tensor([rank])], "averaging")
    return {"both": both.grad.tolist(), "rank1_only": rank1_only.grad.tolist(),
            "neither": neither.grad is None, "buffer": buffer.tolist()}


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
