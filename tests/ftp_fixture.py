"""A real FTP server (pyftpdlib) on 127.0.0.1 for tests: dataset archives fetched over ftp://, and an
fsspec filesystem (fsspec's FTP implementation) to list and read inputs from."""

import contextlib
import threading


@contextlib.contextmanager
def ftp_server(root):
    """A real FTP server (pyftpdlib) on 127.0.0.1 serving ``root`` read-only to anonymous users; yields
    its base URL and the REST offsets it was asked for."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    rests: list[int] = []

    class Handler(FTPHandler):
        def ftp_REST(self, line):  # noqa: N802 - pyftpdlib's naming
            rests.append(int(line))
            return super().ftp_REST(line)

    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(root))
    Handler.authorizer = authorizer
    server = FTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"ftp://127.0.0.1:{server.address[1]}", rests
    finally:
        server.close_all()
        thread.join(10)
