"""Print the property tier's seed (to replay the run) and how many cases it checked."""
from mmkernels.testing import property as prop

_cases = {}


def pytest_runtest_logreport(report):
    for key, value in getattr(report, "user_properties", ()):
        if key == "property_cases":
            _cases[report.nodeid] = value


def pytest_terminal_summary(terminalreporter):
    seed = prop.seed_in_use()
    if seed is None:
        return
    terminalreporter.write_line(f"mmkernels property tests: {sum(_cases.values())} cases passed in {len(_cases)} "
                                f"tests, seed {seed}: replay with {prop.SEED_VARIABLE}={seed}")
    if terminalreporter.config.getoption("verbose") > 0:
        for nodeid, n in sorted(_cases.items()):
            terminalreporter.write_line(f"  {n:5d} cases  {nodeid}")
