"""The run's task server: everything it preloads imports, and it holds nothing a forked task would share."""

import os
import stat

from pipelines.runner import _TaskServer
from pipelines.task_server import PRELOAD


def test_the_task_server_preloads_every_module_and_opens_no_store_or_file(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "a") as log_file:
        server = _TaskServer(log_file)
        try:
            assert server.ready(timeout=120), log_path.read_text()
            fd_dir = f"/proc/{server.proc.pid}/fd"
            targets = {fd: os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}
            regular = {t for fd, t in targets.items()
                       if os.path.exists(t) and stat.S_ISREG(os.stat(t).st_mode) and int(fd) > 2}
        finally:
            server.close()
    text = log_path.read_text()
    # a renamed or missing module would silently cost every task its import again
    assert "not preloaded" not in text, text
    assert f"{len(PRELOAD)} modules preloaded" in text
    # no MLflow store, SQLite database or other file is open in the process every task is forked from
    assert regular <= {str(log_path)}, regular
    assert not any(".db" in t or "sqlite" in t for t in targets.values()), targets
    assert not os.path.exists(server.socket_path)
