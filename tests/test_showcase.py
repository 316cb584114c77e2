"""The main job's tour: every mixer and impl appears, and forward agrees with streaming."""
import pytest
from mixer_cases import runnable_impls

from seqmix import SeqmixError, list_mixers, mixer_class
from seqmix.showcase import format_tour, tour


def test_tour_covers_every_mixer_and_impl_and_streams_like_forward():
    rows = tour(width=8, length=40, batch=2, piece=7)
    expected = {(name, impl) for name in list_mixers() for impl in mixer_class(name).impls}
    assert {(row.mixer, row.impl) for row in rows} == expected
    table = format_tour(rows)
    for row in rows:
        # A path this machine cannot run (native code without a C++ compiler) is listed with the reason.
        if row.impl not in runnable_impls(row.mixer):
            assert row.forward is None and "C++ compiler" in row.not_run and row.not_run in table, row
            continue
        assert row.not_run is None and row.max_stream_error < 1e-4, row
        assert row.forward.runs == 5 and row.forward.low_ms <= row.forward.median_ms <= row.forward.high_ms, row
    assert all(name in table for name in list_mixers())


@pytest.mark.parametrize("width", [1, 3])
def test_a_width_some_mixer_cannot_take_is_refused_naming_the_width_and_the_mixer(width):
    with pytest.raises(SeqmixError, match=rf"tour: width={width} does not suit \w+ with its default options .*width=64"):
        tour(width=width, length=8, batch=1, piece=3, repeats=1)


def test_a_tour_of_a_huge_repeat_count_ends_within_its_time_per_row():
    """repeats=10**12 ran until it was killed: each row now stops timing after its seconds."""
    rows = tour(width=8, length=8, batch=1, piece=3, repeats=10**12, seconds_per_row=0.01)
    timed = [row for row in rows if row.forward is not None]
    assert timed and all("s in all: stopped after" in row.forward.note for row in timed)


def test_a_piece_longer_than_the_sequence_and_memory_running_out_are_told_as_such(monkeypatch):
    """piece=1000 at length=8 ran and claimed to stream 1000 tokens per step; a width no memory holds
    was told as a width that does not suit the mixer."""
    import seqmix.showcase

    with pytest.raises(SeqmixError, match=r"tour: piece=9 is more than length=8: .* give piece <= length"):
        tour(width=8, length=8, batch=1, piece=9, repeats=1)

    def out_of_memory(name, width, **options):
        raise SeqmixError(f"{name}: RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 6400000000 bytes")

    monkeypatch.setattr(seqmix.showcase, "build_mixer", out_of_memory)
    with pytest.raises(SeqmixError, match=r"tour: out of memory building \w+ at width=8 .*; give a smaller width"):
        tour(width=8, length=8, batch=1, piece=3, repeats=1)
