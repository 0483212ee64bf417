"""Watch mode (`python3 client.py` with no names): the person's main way to use the client.

The client runs as a real subprocess against a server thread; input.txt is edited while it runs.
"""

import os
import signal
import subprocess
import sys
import time
import unittest

from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WatchModeTest(unittest.TestCase):
    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.st = support.ServerThread(self.tmp.files).start()
        self.addCleanup(self.st.stop)
        self.input = os.path.join(self.tmp.root, "input.txt")

    def wait_for_file(self, name, timeout=10):
        path = os.path.join(self.tmp.downloads, name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                return True
            time.sleep(0.02)
        return False

    def append(self, text):
        with open(self.input, "a", encoding="utf-8") as f:
            f.write(text)

    def test_new_names_are_fetched_once_until_ctrl_c(self):
        first = self.tmp.make_file("first.txt", 3000, seed=1)
        second = self.tmp.make_file("second file.bin", 200000, seed=2)
        with open(self.input, "w", encoding="utf-8") as f:
            f.write("# names to fetch\n\n  first.txt  \n")
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "client.py"), "--port", str(self.st.address[1]),
             "--input", self.input, "--out", self.tmp.downloads],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.tmp.root)

        def stop():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            proc.stdout.close()
        self.addCleanup(stop)

        if not self.wait_for_file("first.txt"):
            proc.kill()
            self.fail("first name not fetched: %s" % proc.communicate(timeout=10)[0])
        self.assertEqual(self.tmp.downloaded("first.txt"), first)
        # New names added while it runs are fetched within about a second; a name added again
        # is tried again (here it is complete already: not fetched again), and a name the
        # server does not have is said once.
        stamp = os.stat(os.path.join(self.tmp.downloads, "first.txt"))
        self.append("second file.bin\nfirst.txt\nmissing.txt\n")
        self.assertTrue(self.wait_for_file("second file.bin"), "new name not picked up")
        self.assertEqual(self.tmp.downloaded("second file.bin"), second)
        time.sleep(1.2)   # time for a wrong second fetch of first.txt, if there were one
        if os.name == "nt":
            proc.kill()
            out = proc.communicate(timeout=10)[0].decode("utf-8", "replace")
        else:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=10)[0].decode("utf-8", "replace")
            self.assertEqual(proc.returncode, 130, out)
            self.assertNotIn("Traceback", out)
        self.assertIn("first.txt", out)                 # the listing was shown
        self.assertEqual(out.count("first.txt: ") - out.count("first.txt: added again"), 2, out)
        self.assertIn("first.txt: added again; trying it again", out)
        self.assertRegex(out, r"(?m)^first\.txt: already in .*; skipped$")
        after = os.stat(os.path.join(self.tmp.downloads, "first.txt"))
        self.assertEqual((after.st_ino, after.st_mtime_ns), (stamp.st_ino, stamp.st_mtime_ns))
        self.assertEqual(out.count("second file.bin: "), 1, out)
        self.assertEqual(out.count("missing.txt: FAILED: not on the server"), 1, out)
        self.assertEqual(sorted(os.listdir(self.tmp.downloads)), ["first.txt",
                                                                  "second file.bin"])


if __name__ == "__main__":
    unittest.main()
