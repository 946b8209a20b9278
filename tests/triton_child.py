"""Running a test file's Triton tests under the interpreter, in a child pytest process.

The interpreter only works if TRITON_INTERPRET=1 was set before triton was first imported
(triton.language's own helpers are decorated at import time), and the variable must not leak into
other test modules (it makes the triton backend accept CPU tensors). So a test file that is not
itself running interpreted starts one child pytest on itself with TRITON_INTERPRET=1.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreting_in_process() -> bool:
    """True when this process runs Triton kernels in the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(triton.language.standard.zeros, InterpretedFunction)


def run_in_interpreter(test_file: str, *pytest_args: str) -> None:
    """Run ``test_file`` (with ``pytest_args``) in a child pytest under TRITON_INTERPRET=1 and
    assert that it passed and ran tests."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-x",
                           "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, ("interpreter run failed:\n" + proc.stdout[-6000:]
                                  + proc.stderr[-3000:])
    assert " passed" in proc.stdout and " failed" not in proc.stdout
