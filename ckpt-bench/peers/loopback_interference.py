"""O_DIRECT write time of 2 GiB (8 MiB blocks, 1, 2 and 4 writes in flight),
idle and while a loopback TCP stream runs on the same cores (sender at nice
0, receiver at nice 19), three rounds each, medians.

    python3 ckpt-bench/peers/loopback_interference.py target/qd.bin

It shows how much a server receiving on the same host (what the peer and S3
servers of `ckpt-bench flush --alongside` are) slows the disk, whatever the
checkpointer does: the receive path's kernel work is not lowered by nice.
The file is removed after each write.
"""

import mmap
import os
import subprocess
import sys
import threading
import time

TOTAL = 2 << 30
BLOCK = 8 << 20
PORT = 47555

RECEIVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {PORT}))
s.listen(1)
c, _ = s.accept()
b = bytearray(1 << 20)
while c.recv_into(b):
    pass
"""

SENDER = f"""
import socket, time
time.sleep(0.3)
s = socket.create_connection(("127.0.0.1", {PORT}))
d = b"x" * (16 << 20)
while True:
    s.sendall(d)
"""


def write_file(path, buf, in_flight):
    """Writes TOTAL bytes with `in_flight` threads and fdatasync; seconds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    blocks = TOTAL // BLOCK
    next_block = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_block[0]
                next_block[0] += 1
            if i >= blocks:
                return
            os.pwrite(fd, buf, i * BLOCK)

    start = time.time()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.fdatasync(fd)
    took = time.time() - start
    os.close(fd)
    os.unlink(path)
    return took


def main():
    path = sys.argv[1]
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    results = {}
    for _ in range(3):
        for load in (False, True):
            procs = []
            if load:
                procs = [
                    subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", RECEIVER]),
                    subprocess.Popen([sys.executable, "-c", SENDER]),
                ]
                time.sleep(1)
            for in_flight in (1, 2, 4):
                results.setdefault((load, in_flight), []).append(
                    write_file(path, buf, in_flight)
                )
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    for (load, in_flight), runs in sorted(results.items()):
        runs.sort()
        print(
            f"{'loopback stream' if load else 'idle':<16} {in_flight} in flight: "
            f"median {runs[len(runs) // 2]:.3f} s  runs {' '.join(f'{r:.3f}' for r in runs)}"
        )


if __name__ == "__main__":
    main()
