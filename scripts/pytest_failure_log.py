"""pytest plugin: write each failure's report to $HK_FAILURE_LOG the moment it arrives.

A run stopped at its time limit then still shows every failure so far (xdist prints them only at
the end). Used by scripts/gpu_check.sh:  PYTHONPATH=scripts pytest -p pytest_failure_log ...
"""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("HK_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes
        return
    with open(path, "a") as log:
        log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
