"""The simulator's app: a deterministic in-memory key-value map with the demo hashmap's grammar
(PUT/GET/REMOVE/SIZE). A plain function of its inputs, so every replica's copy and the
reference execution must agree byte for byte.
"""


class KVApp:
    def __init__(self):
        self.data = {}

    def execute(self, request: bytes) -> bytes:
        parts = request.split()
        if not parts:
            return b"ERR empty request"
        cmd = parts[0].upper()
        if cmd == b"PUT" and len(parts) == 3:
            self.data[parts[1]] = parts[2]
            return b"OK"
        if cmd == b"GET" and len(parts) == 2:
            value = self.data.get(parts[1])
            return b"NOT_FOUND" if value is None else b"VALUE " + value
        if cmd == b"REMOVE" and len(parts) == 2:
            return b"OK" if self.data.pop(parts[1], None) is not None else b"NOT_FOUND"
        if cmd == b"SIZE" and len(parts) == 1:
            return b"SIZE %d" % len(self.data)
        return b"ERR unknown command"
