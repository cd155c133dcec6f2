"""Every lesson under the README's exact command, real torchrun with 4 ranks: it must exit 0 and
print all of its docstring's "What you should see" block, which shows such a run. (A file of its
own so that pytest-xdist runs these beside tests/test_lessons.py's.)"""

import pytest
from test_lessons import assert_ran

from conftest import LESSONS, ROOT, free_port, lesson_ids, run_command


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_four_ranks(path):
    # The README's exact command, real torchrun, as the docstring shows it: the default backend
    # (gloo here, with the line saying why). Its port comes from torchrun's own PET_MASTER_PORT,
    # so that the command stays exact and runs beside others. The other runs are warm launches.
    command = ["torchrun", "--nproc-per-node", "4", str(path.relative_to(ROOT))]
    env = {"COURSE_BACKEND": "auto", "PET_MASTER_PORT": str(free_port())}
    result = run_command(command, 300, env, cwd=ROOT)
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    assert_ran(result, path, 4)
