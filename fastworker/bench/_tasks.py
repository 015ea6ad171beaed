"""The tasks the bench measures with, served by the nodes it starts.

They do as little as possible on purpose: the bench measures fastworker's
path (client, sockets, control plane, worker), not the work.  Their names
are namespaced because ``@task`` names are global to a process: a plain
``add`` would collide with a user's own ``add`` (``examples.tasks`` has one)
when both modules are loaded into the workers of a cluster under test.

To measure an existing cluster, start its workers with
``--task-modules fastworker.bench._tasks``.
"""

from __future__ import annotations

from ..tasks.registry import task

__all__ = ["ADD", "ECHO", "MODULE", "add", "echo"]

MODULE = __name__
ADD = "fastworker.bench.add"
ECHO = "fastworker.bench.echo"


@task(name=ADD)
def add(a: int, b: int) -> int:
    """The trivial task: the cost of a task is then all framework."""
    return a + b


@task(name=ECHO)
def echo(payload: str) -> int:
    """Receives a payload of ``--payload-bytes`` and answers its length, so only one way is big."""
    return len(payload)
