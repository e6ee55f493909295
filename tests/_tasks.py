"""Counting the tasks of a Trio run (to see that an actor or reader gave up its task)."""

from __future__ import annotations

import trio


def task_count() -> int:
    """Every task of the current run, from the root down."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)
