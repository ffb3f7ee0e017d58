"""The suite's xdist groups hold (tests/xdist_groups.py): under ``-n 2 --dist loadgroup`` the
tests of one group run on one worker, one after another."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GROUPED = """
import os, time, pytest
pytestmark = pytest.mark.xdist_group("cluster")
@pytest.mark.parametrize("n", range({count}))
def test_{name}(n):
    time.sleep(0.2)
"""


def test_the_tests_of_a_group_run_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(GROUPED.format(count=3, name="a"))
    (tmp_path / "test_b.py").write_text(GROUPED.format(count=3, name="b"))
    (tmp_path / "test_plain.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(6)))
    args = ["-n", "2", "--dist", "loadgroup", "-v", "-p", "tests.xdist_groups", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED \S*::(test_\w+)\[\d\]@cluster", done.stdout)
    assert len(ran) == 6, done.stdout[-3000:]
    assert len({worker for worker, _ in ran}) == 1, ran
