"""Version ordering (reconciler/versions.py): the tricky cases, then total-order laws.

The table pins the documented rule: segments are runs of digits or letters,
numbers compare as integers, letters case-insensitively, a number beats
letters at the same position, trailing zero segments do not count, and
otherwise the longer version is newer.
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.versions import at_least, compare_versions, same_version, version_key

# (older, newer): compare_versions(older, newer) == -1
OLDER_NEWER = [
    ("1.9", "1.10"),  # numbers compare as numbers, not text
    ("1.9.9", "1.10"),
    ("2.0", "2.0.1"),
    ("2.0.0", "2.0.1"),
    ("22.00", "23.01"),
    ("23.01", "23.2"),  # 01 is 1, and 1 < 2
    ("1.0", "1.0a"),  # a longer version is newer ...
    ("1.0a", "1.0.1"),  # ... but at the same position a number beats letters
    ("1.0a", "1.0b"),
    ("1.0-alpha", "1.0-beta"),
    ("1.0-rc1", "1.0-rc2"),
    ("1.0-rc9", "1.0-rc10"),
    ("alpha", "beta"),  # letters only
    ("beta", "1"),  # letters before numbers
    ("zzz", "0.1"),
    ("9", "10"),
    ("0.9", "0.81"),  # 81 > 9: a version is not a decimal fraction
    ("14.38.33130", "14.38.33131"),
    ("5.1.0", "5.1.0.1"),
    ("1.2", "1.10.0"),
    ("23.1", "24.00"),
    ("2023.12.31", "2024.1.1"),
]

# pairs that are the same version
SAME = [
    ("2.0", "2.0.0"),
    ("2", "2.0.0.0"),
    ("23.01", "23.1"),  # leading zeros do not count
    ("1.002", "1.2"),
    ("007", "7"),
    ("1.0RC1", "1.0rc1"),  # letters are case-insensitive
    ("BETA", "beta"),
    ("1-2", "1.2"),  # every separator is just a separator
    ("1_2+3~4", "1.2.3.4"),
    ("1.0a", "1.0.a"),
    ("3.0.0-0", "3"),
]


@pytest.mark.parametrize(("older", "newer"), OLDER_NEWER)
def test_older_compares_below_newer(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1
    assert version_key(older) < version_key(newer)
    assert not same_version(older, newer)
    assert at_least(newer, older)
    assert not at_least(older, newer)


@pytest.mark.parametrize(("a", "b"), SAME)
def test_same_versions_compare_equal(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0
    assert compare_versions(b, a) == 0
    assert same_version(a, b)
    assert version_key(a) == version_key(b)
    assert at_least(a, b) and at_least(b, a)


def test_not_equal_strings_that_only_look_alike() -> None:
    assert not same_version("1.0.0a", "1a")  # the zeros are not trailing
    assert not same_version("10", "1.0")
    assert not same_version("1.01", "1.1.0.1")
    assert compare_versions("1a", "1.0a") == -1  # letters at position 2 lose to the number 0


def test_the_example_repo_versions_sort_as_an_admin_expects() -> None:
    versions = ["23.01", "9.20", "22.00", "23.1", "24.00", "19.00", "23.01a", "4.65"]
    ordered = sorted(versions, key=version_key)
    assert ordered == ["4.65", "9.20", "19.00", "22.00", "23.01", "23.1", "23.01a", "24.00"]


# ------------------------------------------------------------------ properties

_segment = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    st.integers(min_value=0, max_value=999).map(lambda n: f"{n:04d}"),  # leading zeros
    st.text(alphabet="abcxyzABRC", min_size=1, max_size=4),
)
_separator = st.sampled_from([".", "-", "_", "+", "~", ""])


@st.composite
def versions(draw: st.DrawFn) -> str:
    parts = draw(st.lists(_segment, min_size=1, max_size=6))
    text = parts[0]
    for part in parts[1:]:
        text += draw(_separator) + part
    return text


@settings(max_examples=300, deadline=None)
@given(versions(), versions())
def test_antisymmetry(a: str, b: str) -> None:
    assert compare_versions(a, b) == -compare_versions(b, a)
    assert (compare_versions(a, b) == 0) == same_version(a, b)
    assert compare_versions(a, a) == 0


@settings(max_examples=300, deadline=None)
@given(versions(), versions(), versions())
def test_transitivity(a: str, b: str, c: str) -> None:
    x, y, z = sorted([a, b, c], key=version_key)
    assert compare_versions(x, y) <= 0
    assert compare_versions(y, z) <= 0
    assert compare_versions(x, z) <= 0
    for p, q, r in itertools.permutations([a, b, c]):
        if compare_versions(p, q) <= 0 and compare_versions(q, r) <= 0:
            assert compare_versions(p, r) <= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(versions(), max_size=12), st.randoms())
def test_sorting_is_stable_and_independent_of_input_order(items: list[str], rnd: object) -> None:
    by_key = sorted(items, key=version_key)
    by_cmp = sorted(items, key=functools.cmp_to_key(compare_versions))
    assert by_key == by_cmp
    shuffled = list(items)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    resorted = sorted(shuffled, key=version_key)
    assert [version_key(v) for v in resorted] == [version_key(v) for v in by_key]
    # stable: equal versions keep their input order
    for key, group in itertools.groupby(resorted, key=version_key):
        members = list(group)
        assert members == [v for v in shuffled if version_key(v) == key]


@settings(max_examples=200, deadline=None)
@given(versions(), st.integers(min_value=1, max_value=4))
def test_trailing_zero_segments_never_change_a_version(version: str, zeros: int) -> None:
    assert same_version(version + ".0" * zeros, version)
    assert not same_version(version + ".1", version)
    assert compare_versions(version + ".1", version) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**9))
def test_numeric_segments_compare_as_integers(x: int, y: int) -> None:
    expected = (x > y) - (x < y)
    assert compare_versions(f"1.{x}", f"1.{y}") == expected
    assert compare_versions(f"{x:012d}", str(y)) == expected
