"""Data-parallel training over processes on one CPU (`torch.distributed`, gloo on loopback).

At the embedded models' sizes a training step is hundreds of small ops, and a second thread inside each op buys
less than a second core could give. Two processes of one thread each are the other way to use both cores: every
process draws the step's whole batch from the step's rng, as one process would, keeps its share of the rows
(`my_share`), computes their loss and gradients, and one all-reduce averages the gradients, so every process takes
the same optimizer step and holds the same weights. The first process logs and saves; a resumed run continues from
its checkpoint in every process. Which way is faster depends on the model: `multimodal bench train MODEL
--processes 1,2` measures both.

With one process (the default) nothing here changes a run: its batches and steps are those it always had.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes) of this training process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process logs and saves (the first, or the only one)."""
    return world()[0] == 0


PARALLEL_MODELS = ("vlm", "diffusion")  # the judge's contrastive loss needs its whole batch in one process


def check_processes(model: str, device: str, processes: int) -> None:
    """Refuse data-parallel processes where they do not apply, in one sentence."""
    if processes > 1 and (model not in PARALLEL_MODELS or device != "cpu"):
        raise ValueError(f"--processes is for vlm and diffusion training on the CPU, not {model} on {device} (the "
                         "judge's contrastive loss needs its whole batch in one process).")


def my_share(rows):
    """This process's rows of a batch that every process drew alike from the step's rng: every n-th row from its
    rank on (n processes), so the processes together hold the batch one process would train on. A list, tuple or
    tensor; all of it in one process."""
    rank, size = world()
    if len(rows) % size:
        raise ValueError(f"A batch of {len(rows)} does not split evenly over {size} processes.")
    return rows[rank::size]


def average_gradients(params: Sequence[torch.Tensor], stop: bool) -> bool:
    """Average the gradients of `params` over the processes in one all-reduce, and agree on stopping: returns
    whether any process asked to `stop` (its time budget ran out), so that all leave the loop at the same step.

    A parameter without a gradient in some process counts as zero there; one without a gradient in every process
    keeps none, as the optimizer would have seen it in one process."""
    _, size = world()
    pieces = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in params]
    flags = torch.tensor([p.grad is not None for p in params] + [stop], dtype=torch.float32)
    buffer = torch.cat(pieces + [flags])  # [sum of numel + len(params) + 1]
    dist.all_reduce(buffer)
    flags_start, offset = buffer.numel() - len(flags), 0
    for index, param in enumerate(params):
        count = param.numel()
        if buffer[flags_start + index] > 0:
            param.grad = (buffer[offset:offset + count] / size).view_as(param).to(param.dtype)
        offset += count
    return bool(buffer[-1] > 0)


def average_scalars(values: Sequence[float]) -> list[float]:
    """The mean of each value over the processes (the logged losses)."""
    _, size = world()
    if size == 1:
        return list(values)
    buffer = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(buffer)
    return (buffer / size).tolist()


def launch(fn: Callable, processes: int, threads: int, *args):
    """Run `fn(*args)` in `processes` processes of `threads` threads each, joined in one gloo group on loopback;
    returns the first process's result. An error in any process stops them all and is raised here."""
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, not {processes}.")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool is forked
    results = context.SimpleQueue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, processes, port, threads, results, fn, args))
               for rank in range(processes)]
    for worker in workers:
        worker.start()
    outcome = None
    for _ in range(processes):
        message = results.get()
        if message[0] == "error":
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join()
            raise RuntimeError(f"Training process {message[1]} failed: {message[2]}")
        if message[1] == 0:
            outcome = pickle.loads(message[2])
    for worker in workers:
        worker.join()
    return outcome


def _worker(rank: int, size: int, port: int, threads: int, results, fn: Callable, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=size)
        # Pickled here, by value: a tensor sent as it is would point into this process's memory, gone at its exit.
        results.put(("ok", rank, pickle.dumps(fn(*args))))
    except BaseException as error:  # reported to the launcher, which stops the other processes
        traceback.print_exc()
        results.put(("error", rank, f"{type(error).__name__}: {error}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
