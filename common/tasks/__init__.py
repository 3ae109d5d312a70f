"""The built-in tasks, each written on the public task API (``metafleet.common.task``) like a user's own.

A name here is what ``--task NAME`` (or ``--dataset NAME``) loads; every other task is a file or module.
"""

BUILTIN_TASKS = {
    "sinusoid": "metafleet.common.tasks.sinusoid",
    "watch": "metafleet.common.tasks.watch",
    "omniglot": "metafleet.common.tasks.omniglot",
    "fashion-mnist": "metafleet.common.tasks.fashion_mnist",
    "shakespeare": "metafleet.common.tasks.shakespeare",
}
