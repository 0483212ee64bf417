"""Issue 10, item 3: a range whose end-to-end check failed never reaches the resume record.

Real server and client on loopback, port 0, temporary folders. A client transfer is made to
take a flipped byte (as a bad disk or a buggy network card would), so the range's end-to-end
check fails; Ctrl-C lands right after that datagram, before housekeeping has dealt with the part.

Run: python3 -m tests test_failed_range
"""

import json
import unittest
from unittest import mock

import udpxfer.fetch
from tests import support
from udpxfer.client_transfer import ClientTransfer
from udpxfer.download import FAILED_CHECK, Part
from udpxfer.partial import PartialFile

FLIP_AT = 100


class FlippingTransfer(ClientTransfer):
    """Hands the caller a payload with the byte at FLIP_AT flipped (so that is what is written
    to disk), makes the range's end-to-end check fail, and raises KeyboardInterrupt right after
    the datagram that ended it, before housekeeping."""

    def receive(self, msg, now):
        payload = super().receive(msg, now)
        if payload is not None:
            start = self.pos - len(payload)
            if start <= FLIP_AT < self.pos:
                flipped = bytearray(payload)
                flipped[FLIP_AT - start] ^= 0x01
                payload = bytes(flipped)
        if self.start <= FLIP_AT and self.outcome == "done":
            # The check may be computed before the payload reaches the caller, and then it
            # does not see the flip: the bytes on disk are wrong all the same, so say it failed.
            self.outcome = sorted(FAILED_CHECK)[0]
        if self.outcome in FAILED_CHECK:
            raise KeyboardInterrupt   # Ctrl-C after the datagram, before housekeeping
        return payload


def record(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class FailedCheckNeverRecordedTest(unittest.TestCase):

    def setUp(self):
        self.tmp = support.TempDirs()
        self.addCleanup(self.tmp.cleanup)

    def test_ctrl_c_right_after_a_failed_check_keeps_the_bytes_out_of_the_record(self):
        data = self.tmp.make_file("f.bin", 400 * 1024, seed=21)
        st = support.ServerThread(self.tmp.files).start()
        self.addCleanup(st.stop)
        settings = support.fast_client_settings(first_range=64 * 1024)
        c = support.make_client(st.address, self.tmp.downloads, settings)
        target = PartialFile(self.tmp.downloads, "f.bin")
        try:
            with mock.patch.object(udpxfer.fetch, "ClientTransfer", FlippingTransfer):
                with self.assertRaises(KeyboardInterrupt):
                    c.fetch("f.bin", target, 2, len(data))
        finally:
            target.release()
        rec = record(target.record_path)
        for a, b, _ in rec["kept"]:
            self.assertFalse(a <= FLIP_AT < b, "the record claims the failed range: %r"
                             % rec["kept"])
        with open(target.part_path, "rb") as f:   # what it claims is right
            for a, b, _ in rec["kept"]:
                f.seek(a)
                self.assertEqual(f.read(b - a), data[a:b], "recorded [%d, %d)" % (a, b))
        # The next run resumes from that record and saves the right file.
        support.download(st.address, "f.bin", self.tmp.downloads, parts=2, settings=settings)
        self.assertEqual(self.tmp.downloaded("f.bin"), data)

    def test_part_failed_check_predicate(self):
        t = ClientTransfer("x", 0, 10, 0.0)
        part = Part(t, None)
        part.written, part.written_crc = 7, 1234
        self.assertFalse(part.failed_check)
        self.assertEqual(part.claimable(), (0, 7, 1234))
        for outcome in FAILED_CHECK:
            t.outcome = outcome
            self.assertTrue(part.failed_check)
            self.assertIsNone(part.claimable())


if __name__ == "__main__":
    unittest.main()
