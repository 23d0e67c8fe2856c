"""UDP load for the kernel cross-check (tests/tests/kernel_crosscheck.rs).

  udp_rate.py send HOST PORT RATE_BPS SECONDS   paced datagrams of 1,200 bytes
  udp_rate.py sink HOST PORT SECONDS                 prints the bits per second received, measured
                                                from the first datagram for SECONDS (bounded:
                                                gives up after SECONDS + 5 s of waiting)
"""
import socket
import sys
import time

SIZE = 1200


def send(host, port, rate_bps, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\0" * SIZE
    interval = SIZE * 8 / rate_bps
    start = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        # Catch up to the schedule in a burst, then sleep briefly.
        due = int((now - start) / interval)
        while sent < due:
            try:
                s.sendto(payload, (host, port))
            except (BlockingIOError, OSError):
                pass
            sent += 1
        time.sleep(0.0005)


def sink(host, port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(seconds + 5)
    try:
        s.recv(65536)
    except socket.timeout:
        print(0.0)
        return
    start = time.monotonic()
    received = 0
    s.settimeout(0.5)
    while time.monotonic() - start < seconds:
        try:
            received += len(s.recv(65536))
        except socket.timeout:
            break
    print(received * 8 / (time.monotonic() - start))


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        sink(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
