import socket, struct, sys
path, typ, flags, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX); s.connect(path)
s.sendall(struct.pack(">IIII", 0x0c, flags, typ, 0))
buf = b""
while len(buf) < 16:
    d = s.recv(65536)
    if not d: break
    buf += d
res = struct.unpack(">I", buf[:4])[0]
if res != 0:
    print("res", hex(res)); sys.exit(1)
res, rflags, tot, ln = struct.unpack(">IIII", buf[:16])
while len(buf) < 16 + ln:
    buf += s.recv(65536)
open(out, "wb").write(buf[16:16+ln])
print("res", res, "flags", rflags, "tot", tot, "len", ln)
