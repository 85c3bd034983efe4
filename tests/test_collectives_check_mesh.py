"""Debug mode's check mesh: loopback only, and a stranger's connection is never read as a rank.

The mesh's frames are pickles, so its listeners must take only the ranks that know their secret.
Here two real listeners and real sockets build the mesh of two ranks while a stranger connects
first: once with a pickle that would create a file if unpickled, once with a right rank number and a
wrong secret. The ranks' mesh still forms, and the pickle is never unpickled.
"""
from __future__ import annotations

import pickle
import socket
import struct
import threading
from pathlib import Path

from notebook_fabric.collectives.check_mesh import CheckMesh, _connect
from test_live_channel import Touch


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    return listener


def test_the_mesh_forms_past_strangers_and_never_unpickles_theirs(tmp_path: Path) -> None:
    proof = tmp_path / "unpickled"
    listeners = [_listener(), _listener()]
    doors = [(listener.getsockname()[1], bytes([rank]) * 32) for rank, listener in enumerate(listeners)]
    assert all(listener.getsockname()[0] == "127.0.0.1" for listener in listeners)

    # strangers at rank 0's door before rank 1 arrives: a pickle, then rank 1's number with a wrong secret
    payload = pickle.dumps(Touch(str(proof)))
    pickler = socket.create_connection(("127.0.0.1", doors[0][0]))
    pickler.sendall(struct.pack("<q", len(payload)) + payload)
    impostor = socket.create_connection(("127.0.0.1", doors[0][0]))
    impostor.sendall(struct.pack("<i", 1) + b"x" * 32)

    built = {}

    def rank_zero() -> None:
        built[0] = _connect(0, 2, listeners[0], doors, timeout=10)

    thread = threading.Thread(target=rank_zero)
    thread.start()
    built[1] = _connect(1, 2, listeners[1], doors, timeout=10)
    thread.join(timeout=30)
    assert not thread.is_alive()
    for listener in listeners:
        listener.close()

    assert sorted(built[0]) == [1] and sorted(built[1]) == [0]
    meshes = [CheckMesh(0, built[0]), CheckMesh(1, built[1])]
    answers = {}
    other = threading.Thread(target=lambda: answers.setdefault(1, meshes[1].exchange_objects({"rank": 1})))
    other.start()
    answers[0] = meshes[0].exchange_objects({"rank": 0})
    other.join(timeout=10)
    assert answers[0] == answers[1] == [{"rank": 0}, {"rank": 1}]
    assert not proof.exists(), "a stranger's pickle was unpickled"
    for sock in (pickler, impostor):  # both were hung up on
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # closed with the stranger's bytes unread: a reset, not an end of file
        sock.close()
    for mesh in meshes:
        mesh.close()
