"""ForwardLanes: the threads a Classifier replica runs its batched forwards on, sharing one torch thread budget.

    lanes = ForwardLanes(forward, lanes=2, torch_threads=2)
    lanes.warmup(first_forward)          # on lane 0, with every thread: the replica's OpenMP team is made there
    result = await lanes.run(batch)      # on a free lane; lane 0 whenever it is free
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class ForwardLanes:
    """Up to `lanes` forwards at once, each on its own thread. Lane 0 owns the replica's one OpenMP team:
    a forward there gets torch_threads // running threads, so all of them when it runs alone. The other
    lanes run single-threaded forwards and take work only while lane 0 is busy.

    One team per process: libgomp counts the threads of every team in the process, and once they
    outnumber the CPUs it stops spinning at barriers and sleeps at each one (~200 sleeps and +6 ms per
    batch-1 efficientnet_b0 forward on 2 cores). torch.set_num_threads sizes the calling thread's team
    only, so lanes do not change each other's, and the thread that builds the team (warmup) is lane 0."""

    def __init__(self, forward: Callable[..., Any], lanes: int, torch_threads: int) -> None:
        self._forward = forward
        self._threads = max(1, int(torch_threads))
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"forward{i}") for i in range(max(1, int(lanes)))]
        self._busy = [False] * len(self._lanes)
        self._free: asyncio.Semaphore | None = None  # made on the event loop that runs the forwards

    def warmup(self, warm: Callable[[], Any]) -> Any:
        """Run `warm` (a first forward) on lane 0 with every thread: its OpenMP team is made there."""
        return self._lanes[0].submit(self._on_lane, self._threads, warm).result()

    async def run(self, *args: Any) -> Any:
        """forward(*args) on a free lane, with its share of the torch threads."""
        if self._free is None:
            self._free = asyncio.Semaphore(len(self._lanes))
        async with self._free:
            lane = self._busy.index(False)  # lane 0 whenever it is free; the semaphore leaves one free
            self._busy[lane] = True
            threads = max(1, self._threads // sum(self._busy)) if lane == 0 else 1
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._lanes[lane], self._on_lane, threads, self._forward, *args)
            finally:
                self._busy[lane] = False

    @staticmethod
    def _on_lane(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
        from dermaid.inference import set_thread_torch_threads

        set_thread_torch_threads(threads)
        return fn(*args)
