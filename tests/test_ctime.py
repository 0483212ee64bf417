"""Issue 10, item 4: a rewrite in place with the same size and the old modification time put back
(cp -p, touch -r, rsync) changes the file's identity and version, through the change time.

Skipped where the change time does not move with a write (Windows: st_ctime is the creation
time). Real server and client on loopback for the straddling download; port 0, temp folders.

Run: python3 -m tests test_ctime
"""

import os
import re
import time
import unittest

from tests import support
from tests.impair import ImpairProxy, Impairment
from tests.test_resume import DataCounter
from udpxfer.folder import Folder, file_identity, file_version
from udpxfer.wire import format_size

SIZE = 3 * 1024 * 1024


def rewrite_keeping_mtime(path, data):
    """Write `data` over the file in place (same size), then put the old times back."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


class SameSizeOldMtimeTest(unittest.TestCase):

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)
        self.old = self.tmp.make_file("c.bin", SIZE, seed=6)
        self.new = self.tmp.make_file("new.src", SIZE, seed=7)
        self.path = os.path.join(self.tmp.files, "c.bin")
        past = time.time() - 100
        os.utime(self.path, (past, past))

    def rewrite(self):
        rewrite_keeping_mtime(self.path, self.new)

    def skip_unless_ctime_moves(self, before):
        after = os.stat(self.path)
        self.assertEqual((after.st_size, after.st_mtime_ns), (before.st_size, before.st_mtime_ns))
        if after.st_ctime_ns == before.st_ctime_ns:
            self.skipTest("the change time did not move with a write here (e.g. Windows)")
        return after

    def test_identity_and_version_change(self):
        before = os.stat(self.path)
        time.sleep(0.02)   # past the change time's granularity on coarse file systems
        self.rewrite()
        after = self.skip_unless_ctime_moves(before)
        self.assertNotEqual(file_identity(after), file_identity(before))
        self.assertNotEqual(file_version(after), file_version(before))
        for st in (before, after):
            self.assertTrue(re.fullmatch(r"[\x21-\x7e]{1,64}", file_version(st)))
            format_size(st.st_size, file_version(st), b"0" * 16)   # a valid SIZE

    def test_open_source_notices(self):
        folder = Folder(self.tmp.files)
        entry = folder.lookup("c.bin")
        source = entry.open()
        self.addCleanup(source.close)
        self.assertTrue(source.unchanged())
        before = os.stat(self.path)
        time.sleep(0.02)
        self.rewrite()
        self.skip_unless_ctime_moves(before)
        self.assertFalse(source.unchanged())
        self.assertNotEqual(folder.lookup("c.bin").version, entry.version)

    def test_download_straddling_the_rewrite_is_never_mixed(self):
        before = os.stat(self.path)
        st = support.ServerThread(self.tmp.files).start()
        self.addCleanup(st.stop)
        counter = DataCounter(at=8, action=self.rewrite)
        proxy = ImpairProxy(st.address, to_client=Impairment(delay=0.002, drop_if=counter))
        proxy.start()
        self.addCleanup(proxy.close)
        time.sleep(0.02)   # the rewrite comes later still: past the ctime granularity
        c = support.download(proxy.address, "c.bin", self.tmp.downloads, parts=4)
        self.assertGreaterEqual(counter.datagrams, 8)
        self.skip_unless_ctime_moves(before)
        saved = self.tmp.downloaded("c.bin")
        self.assertEqual(saved, self.new, "saved a file mixed from two versions"
                         if saved != self.old else "saved the old version")
        self.assertGreaterEqual(c.stats["restarts"], 1)


if __name__ == "__main__":
    unittest.main()
