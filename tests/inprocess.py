"""main.py in the test's own process: flag parsing, the run and the exit status, without a
Python start-up (about 15 s of imports per real process on the 2-core CPU)."""

import contextlib
import io
import sys
from pathlib import Path

from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402


def run_main(argv, capsys=None):
    """main.py's exit status, stdout and stderr for these arguments, in this process (read
    through pytest's capsys, or captured here when there is none, as in a module fixture)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        flag_values = flags.FlagValues()
        main_module.define_flags(flag_values, sys_argv=["main.py", *argv])
        try:
            rest = main_module.parse_flags(["main.py", *argv], flag_values)
            code = main_module.main(rest, flag_values)
        except SystemExit as e:
            code = e.code
    if capsys is None:
        return code, out.getvalue(), err.getvalue()
    captured = capsys.readouterr()
    return code, captured.out, captured.err
