"""A short fuzz campaign in the suite (tests/fuzz_gguf.py runs long ones): seeded mutations of small
valid files of every kind, each either loaded by the library or refused with a GGUFError naming the file."""

from fuzz_gguf import campaign


def test_mutated_files_load_or_get_a_clear_error():
    counts, findings = campaign(cases=2000, seed=0, workers=2)
    assert not findings, findings[:5]
    assert counts["loaded"] > 100 and counts["GGUFError"] > 100, counts
