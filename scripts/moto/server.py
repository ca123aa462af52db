"""moto_server with every request served one at a time.

moto's threaded server runs requests concurrently without any isolation,
and a cancelled TransactWriteItems rolls back by restoring a copy of the
whole table taken when the transaction began, erasing every write other
requests made in the meantime. With two instances of the service writing
one table (one instance's category transaction is cancelled by the other's,
as designed), that rollback silently undid the other instance's checkpoint
commits. Real DynamoDB isolates transactions; serialising requests gives
moto the same per-request atomicity. (Requests are short; the cost is small.)

Usage: python server.py [moto_server arguments]
"""
import threading

import moto.server as server

_lock = threading.Lock()
_run_simple = server.run_simple


def _serialised(app):
    def serve(environ, start_response):
        with _lock:
            # Produce the whole response inside the lock.
            return list(app(environ, start_response))

    return serve


def _run_simple_serialised(host, port, app, *args, **kwargs):
    return _run_simple(host, port, _serialised(app), *args, **kwargs)


server.run_simple = _run_simple_serialised

if __name__ == "__main__":
    server.main()
