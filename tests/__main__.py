"""Run the whole suite: `python3 -m tests` (from the project folder). Extra arguments are test
name patterns, e.g. `python3 -m tests test_protocol`.

Prints unittest's report, then one closing line "N passed, N failed, N skipped" that CI reads.
"""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv):
    sys.path.insert(0, ROOT)
    loader = unittest.TestLoader()
    if argv:
        suite = unittest.TestSuite(loader.loadTestsFromName("tests." + a.replace(".py", ""))
                                   for a in argv)
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=ROOT)
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
