"""Every random stream a run draws from: seeding at the start, capture and restore for exact resume."""
import random
from typing import Any, Callable, Union

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def seed_this_rank(seed: int, rank: int) -> None:
    """Under torchrun, process `rank` draws its own random stream (dropout masks), derived from the seed
    and the rank, so N processes draw as many distinct noise patterns as one process does. Rank 0 (and a
    single process) keeps the stream of `seed` itself."""
    if rank > 0:
        seed_everything(seed + 1_000_003 * rank)


def capture_rng() -> dict[str, Any]:
    """Every random state that training draws from, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: Union[list, dict[str, Any]], rank: int, seed: int, note: Callable[[str], None]) -> None:
    """Restore this process's saved streams (`states`: one per rank, or one shared by older checkpoints).
    A process the checkpoint has no state for re-derives its stream: the run goes on, not bit-exact."""
    if isinstance(states, dict):
        states = [states]
    if rank >= len(states):
        note(f"note: the checkpoint holds random states of {len(states)} process(es), not of rank {rank}: "
             f"its stream is re-derived from the seed, so this resumed run is not bit-exact")
        seed_this_rank(seed + 7919, rank)
        return
    state = states[rank]
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
