"""A tour of the registry: build every mixer, run it in parallel and streamed, compare the two."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqmix.errors import SeqmixError
from seqmix.registry import build_mixer, list_mixers, mixer_class
from seqmix.timing import Timing, time_calls


@dataclass
class TourRow:
    """One mixer and compute path: size, agreement of forward and streaming, forward time; or why
    it did not run here (``not_run``, e.g. native code without a C++ compiler), the figures None."""

    mixer: str
    impl: str
    parameters: int
    state_size: int
    max_stream_error: float | None
    forward: Timing | None
    not_run: str | None = None


TOUR_SECONDS_PER_ROW = 5.0
"""How long the timed forward calls of one row may take in all: a tour is a quick look, the benchmark measures."""


def tour(width: int = 64, length: int = 256, batch: int = 2, piece: int = 17, seed: int = 0, repeats: int = 5,
         seconds_per_row: float = TOUR_SECONDS_PER_ROW) -> list[TourRow]:
    """Build every registered mixer with each impl and compare forward with step.

    Args:
        width: D. length: L. batch: B.
        piece: tokens per ``step`` call (the last call takes the rest).
        repeats: timed forward calls per row, after one warm-up call; fewer once they take ``seconds_per_row``.
    Returns:
        One row per (mixer, impl), with max |forward − streamed| over all outputs.
    """
    if piece > length:
        # Accepted, the header then said "streamed 1000 tokens per step" of an 8-token sequence.
        raise SeqmixError(f"tour: piece={piece} is more than length={length}: one step would take the whole sequence, "
                          "and nothing would be streamed; give piece <= length")
    rows = []
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=generator)
    for name in list_mixers():
        for impl in mixer_class(name).impls:
            torch.manual_seed(seed)
            try:
                mixer = build_mixer(name, width, impl=impl).eval()
            except SeqmixError as error:  # the tour builds every mixer with its defaults, which bound D
                if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
                    raise SeqmixError(f"tour: out of memory building {name} at width={width} ({error}); give a smaller width") from None
                raise SeqmixError(f"tour: width={width} does not suit {name} with its default options ({error}); "
                                  "give a width every mixer takes, e.g. width=64") from None
            parameters = sum(p.numel() for p in mixer.parameters())
            with torch.no_grad():
                try:
                    y = mixer(x)
                except SeqmixError as error:  # a path this machine cannot run: the tour goes on
                    rows.append(TourRow(name, impl, parameters, mixer.state_size(), None, None, str(error)))
                    continue
                forward = time_calls(lambda: mixer(x), repeats=repeats, warmup=1, max_total_seconds=seconds_per_row)
                state, pieces = mixer.init_state(batch), []
                for begin in range(0, length, piece):
                    y_piece, state = mixer.step(x[:, begin : begin + piece], state)
                    pieces.append(y_piece)
            error = (torch.cat(pieces, dim=1) - y).abs().max().item()
            rows.append(TourRow(name, impl, parameters, mixer.state_size(), error, forward))
    return rows


def format_tour(rows: list[TourRow]) -> str:
    """The rows as an aligned text table; forward times are the median (fastest–slowest) of the timed calls."""
    header = (f"{'mixer':<18} {'impl':<10} {'parameters':>10} {'state/seq':>10} {'max|fwd-stream|':>16} "
              f"{'forward ms, median (range)':>27}")
    lines = [header, "-" * len(header)]
    notes = []
    for r in rows:
        if r.not_run is not None:
            notes.append(f"{r.mixer}/{r.impl} did not run here: {r.not_run}")
            lines.append(f"{r.mixer:<18} {r.impl:<10} {r.parameters:>10,} {r.state_size:>10,} {'—':>16} {'not run (below)':>27}")
            continue
        timing = f"{r.forward.median_ms:.2f} ({r.forward.low_ms:.2f}–{r.forward.high_ms:.2f})"
        lines.append(
            f"{r.mixer:<18} {r.impl:<10} {r.parameters:>10,} {r.state_size:>10,} {r.max_stream_error:>16.2e} {timing:>27}"
        )
    return "\n".join(lines + ([""] + notes if notes else []))
