"""Any spec file of at most 1 MiB is judged without a traceback and within 256 MB.

Each hostile file (``tests/hostile_specs.py``) is validated by a real
``reconciler validate`` process; its peak resident memory is read from the
kernel (``wait4``), so what is bounded is the whole process, C parser
included. How long each takes is measured by ``benchmarks/hostile_bench.py``,
not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_specs import hostile_files, write_case

MEMORY_LIMIT_KB = 256 * 1024
ADDRESS_SPACE_CAP = 4 << 30

pytestmark = pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak memory of a child is read with wait4")


def _cap_address_space() -> None:
    """A regression must fail this test with a MemoryError, not take the machine down with it."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def _validate(repo: Path, scratch: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in KiB) of ``reconciler validate repo``."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "validate", str(repo)], stdout=out, stderr=err,
                                preexec_fn=_cap_address_space)
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and reads its peak memory
    except BaseException:
        proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, out_path.read_text(encoding="utf-8"), err_path.read_text(encoding="utf-8"),
            usage.ru_maxrss)


@pytest.mark.parametrize("case", sorted(hostile_files()))
def test_hostile_file_is_judged_within_bounds(case: str, tmp_path: Path) -> None:
    repo = write_case(tmp_path, case)
    code, out, err, peak_kb = _validate(repo, tmp_path)
    assert code in (0, 1), err
    assert "Traceback" not in err and err == "", err
    lines = out.splitlines()
    assert lines and lines[-1].endswith(("error", "errors")) or lines[-1].startswith("valid")
    assert len(lines) <= 2 + 101 + 1, "errors of one file are capped"
    assert peak_kb < MEMORY_LIMIT_KB, f"{case}: peak {peak_kb} KiB"


def test_the_bombs_are_refused_with_our_own_messages(tmp_path: Path) -> None:
    from reconciler.repo_tree import load_repo

    expected = {
        "alias-node-bomb": "aliases expand to more than",
        "alias-text-bomb": "aliases expand to more than 1024 KiB of text",
        "deep-flow": "YAML nesting is deeper than 64 levels",
        "deep-flow-mapping": "YAML nesting is deeper than 64 levels",
        "deep-block": "YAML nesting is deeper than 64 levels",
        "wide-flow-list": "the file holds more than 100000 YAML values",
        "many-keys": "the file holds more than 100000 YAML values",
        "nested-anchors": "the file nests too many values under long keys to be checked",
        "alias-chain-nesting": "YAML nesting is deeper than 64 levels",
        "long-hex-integer": "/spec/rerun: rerun must be at most 2147483647, got 0xfffff",
    }
    for case, message in expected.items():
        result = load_repo(write_case(tmp_path, case))
        mine = [e for e in result.errors if e.path != "topology.yaml" and "missing required field" not in e.message]
        assert len(mine) == 1 and mine[0].message.startswith(message), (case, mine)
        assert mine[0].line >= 1 and mine[0].column >= 1
