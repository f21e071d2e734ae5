"""Who may touch what on the broker: the Redis 7 ACL users of a deployment's processes (issue 11).

Every process reaching Redis as one all-powerful user means a host agent's credentials are as good as the
orchestration worker's: anyone holding them can pop another host's queue (and take its disk steps off
it), read every message in flight, or flush the broker. With these rules a host agent's user (`asr-host-
NAME`) can consume only its own queue, keep only its own unacknowledged messages, and merely *push* the
messages the engine sends on from one stage to the next; the engine's user (`asr-engine`: orchestration and
recovery workers, beat, the API, Flower) has every key but no administration command.

What kombu's Redis transport and Celery do on the broker, and so what the rules allow (kombu 5.7,
kombu/transport/redis.py):

- A queue is a list, `QUEUE`, plus one per priority step, `QUEUE\\x06\\x16{3,6,9}`; a consumer BRPOPs all of
  them, a producer LPUSHes one. A queue is declared before a message is sent to it: LLEN of each list
  (`_size`) and SADD of the binding `QUEUE\\x06\\x16\\x06\\x16QUEUE` to `_kombu.binding.QUEUE` and to
  `_kombu.binding_permanent.QUEUE`. Celery sends a task to a queue through the anonymous exchange, which
  kombu routes by the routing key alone: the binding tables never decide where a step goes.
- A message delivered and not yet acknowledged (acks_late: until the task ends) is kept in the hash
  `unacked` (by delivery tag) and the sorted set `unacked_index` (by delivery time); a sweep under the lock
  `unacked_mutex` (SET NX and a Lua release script) pushes back those older than the visibility timeout. A
  host agent keeps its own three (`host_unacked_keys`, set by worker.py for a worker started as a host):
  with the shared ones any agent could read every message in flight and, restoring them, must write to
  every queue.
- Remote control (the read-only inspect, worker.py): the worker's queue `NODE.celery.pidbox` is bound to
  the fanout exchange `celery.pidbox`, i.e. a pattern subscription to the channel `/0.celery.pidbox`; the
  binding, which expires, goes through a script that SADDs to `_kombu.binding.celery.pidbox` and ZADDs to
  `_kombu.binding_deadlines` (and a sweep deletes overdue tables). Replies are LPUSHed (with PEXPIRE) to
  `TICKET.reply.celery.pidbox`, routed by the table `_kombu.binding.reply.celery.pidbox` (SMEMBERS).
- Events (task and worker heartbeats, Flower): PUBLISH to the channels `/0.celeryev/ROUTING.KEY`.
- Results: none are stored (every step task has ignore_result), but sending a group subscribes to the
  members' `celery-task-meta-ID` channels (workflows/canvas.py forgets them again).
- The project's own: live job progress, HSET and EXPIRE of `asr:job:JOB:progress` in MULTI/EXEC
  (workflows/progress.py); console sessions `asr:console:*` (the API only).

Rules are Redis 7 ACL words (`ACL SETUSER user WORD...`), with selectors `(...)`: a command is allowed when
the user's root permissions or one selector allow it with all its keys and channels. So the root
permissions hold what a host agent may do with its own keys, and each selector one narrow thing on keys it
shares with others (only LPUSH to other queues, only SADD to binding tables, only PUBLISH of events).
Nothing here knows Celery: the names are kombu's and Celery's defaults, which the project does not change.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from models.db import validate_name

HOST_QUEUE_PREFIX = "host."
HOST_USER_PREFIX = "asr-host-"
ENGINE_USER = "asr-engine"
"""The user of the orchestration and recovery workers, beat, the API and Flower."""
STEP_QUEUES = ("orchestration", "recovery")
"""The engine's queues besides the hosts' (workflows/engine/registry.py)."""

KOMBU_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis priority steps: a queue is one list per step (step 0 is the queue's own name)."""

# Commands a host agent's user may never run, whatever else is added: the categories Redis marks as
# administration or dangerous (CONFIG, FLUSHALL, FLUSHDB, KEYS, ACL, SHUTDOWN, DEBUG, MODULE, MONITOR,
# CLIENT KILL/LIST, REPLICAOF, SAVE, MIGRATE, ...). They come last in every rule list, so no `+` before
# them can bring one back.
_NEVER = ("-@admin", "-@dangerous")


@dataclass(frozen=True)
class BrokerUser:
    """One Redis ACL user: its name and its rules (without password), and what process it is for."""

    name: str
    rules: tuple[str, ...]
    role: str

    def setuser_args(self, password: str) -> list[str]:
        """The arguments after `ACL SETUSER` (for a Redis client's execute_command): the user reset, on,
        known by the SHA-256 of `password` only, with its rules."""
        return [self.name, "reset", "on", f"#{password_hash(password)}", *self.rules]

    def setuser_command(self, password: str) -> str:
        """`ACL SETUSER ...` as one line for redis-cli (a selector, which has spaces, in double quotes)."""
        return " ".join(["ACL", "SETUSER", *(f'"{word}"' if " " in word else word
                                             for word in self.setuser_args(password))])

    def acl_file_line(self, password: str) -> str:
        """The user's line in a Redis ACL file (`aclfile`): the same words, none quoted (the file is split at
        spaces, and a selector's words are joined again between its parentheses)."""
        name, _reset, *rules = self.setuser_args(password)
        return " ".join(["user", name, *rules])


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def new_password() -> str:
    """A random password for a broker user (256 bits, URL-safe: it goes into a redis:// URL as it is)."""
    return secrets.token_urlsafe(32)


def host_user_name(host_name: str) -> str:
    return HOST_USER_PREFIX + validate_name(host_name, "host")


def queue_key_patterns(queue: str) -> list[str]:
    """Key patterns matching exactly the Redis lists of the kombu queue `queue` (a host's or the engine's,
    named as validate_name allows): its own name, and its name followed by anything that cannot continue a
    name, which is kombu's separator before a priority step. So `host.web1`'s patterns match
    `host.web1\x06\x163` but not `host.web10` nor `host.web1.b`; and they are printable, as an ACL file
    must be (it does not read quoted words)."""
    return [queue, f"{queue}[^-._a-zA-Z0-9]*"]


def host_unacked_keys(host_name: str) -> dict[str, str]:
    """kombu transport options giving host `host_name`'s agent its own unacknowledged-message keys."""
    validate_name(host_name, "host")
    return {"unacked_key": f"unacked.host.{host_name}", "unacked_index_key": f"unacked_index.host.{host_name}",
            "unacked_mutex_key": f"unacked_mutex.host.{host_name}"}


def _keys(access: str, keys: Sequence[str]) -> list[str]:
    return [f"{access}~{key}" for key in keys]


def host_agent_user(host_name: str, *, db: int = 0) -> BrokerUser:
    """The ACL user of host `host_name`'s agent (a worker on queue host.NAME only) on database `db`."""
    queue = HOST_QUEUE_PREFIX + validate_name(host_name, "host")
    own = [*queue_key_patterns(queue), *host_unacked_keys(host_name).values()]
    fanout = f"/{db}."
    rules = [
        "resetkeys", "resetchannels", "-@all",
        # Connecting: AUTH, HELLO, PING, SELECT, CLIENT SETNAME/ID... (CLIENT KILL/LIST go with _NEVER).
        "+@connection",
        # Its own queue and unacknowledged messages: consume (BRPOP, RPOP), put back (LPUSH/RPUSH after a
        # visibility timeout), size (LLEN), acknowledge (HDEL/ZREM), sweep under the lock (SET NX, the
        # release script's GET and DEL; WATCH/MULTI/EXEC around a restore).
        *_keys("", own),
        "+brpop", "+rpop", "+lpush", "+rpush", "+llen", "+exists",
        "+hset", "+hget", "+hdel", "+zadd", "+zrem", "+zrange", "+zrangebyscore", "+zrevrangebyscore",
        "+set", "+get", "+del", "+pexpire",
        "+multi", "+exec", "+discard", "+watch", "+unwatch",
        "+evalsha", "+eval", "+script|load", "+script|exists", "+time",
        # Remote control (read-only inspect): the pattern subscription of its pidbox queue, the binding of
        # that queue (expiring: script SADD + ZADD to the deadlines, and the sweep of overdue tables).
        f"&{fanout}celery.pidbox",
        "+psubscribe", "+punsubscribe", "+subscribe", "+unsubscribe",
        "~_kombu.binding_deadlines", "~_kombu.binding.celery.pidbox", "~_kombu.binding.reply.celery.pidbox",
        "+smembers", "+sadd",
        *_NEVER,
        # The next stage's steps, sent by whichever worker ends a stage (engine.jobs.advance): to any
        # host's queue and to the engine's; push only (no pop, no LTRIM, no DEL) and the declaration's LLEN.
        "(" + " ".join(["+lpush", "+llen", f"%W~{HOST_QUEUE_PREFIX}*",
                        *_keys("%W", [key for queue in STEP_QUEUES for key in queue_key_patterns(queue)])]) + ")",
        # Declaring those queues: add their bindings (never remove one).
        "(" + " ".join(["+sadd", "%W~_kombu.binding.*", "%W~_kombu.binding_permanent.*"]) + ")",
        # Replies to read-only inspect questions: pushed to the asker's reply queue, which expires; and the
        # size of its own pidbox queue, which declaring it asks (LLEN).
        "(" + " ".join(["+lpush", "+pexpire", "%W~*.reply.celery.pidbox"]) + ")",
        "(" + " ".join(["+llen", "%R~*.celery.pidbox*"]) + ")",
        # Task and worker events for Flower: publish only (subscribing to them would show every task).
        "(" + " ".join(["+publish", f"&{fanout}celeryev/*"]) + ")",
        # Live progress of its steps (workflows/progress.py): write only.
        "(" + " ".join(["+hset", "+expire", "%W~asr:job:*:progress"]) + ")",
        # A group of steps sent on subscribes to its members' (never stored) results.
        "(" + " ".join(["+subscribe", "+unsubscribe", "&celery-task-meta-*"]) + ")",
    ]
    return BrokerUser(host_user_name(host_name), tuple(rules), f"agent of host {host_name}")


def engine_user() -> BrokerUser:
    """The user of the orchestration and recovery workers, beat, the API and Flower: every key and channel
    (they send to and consume every engine queue, keep the shared unacknowledged messages, read progress and
    console sessions), no administration."""
    return BrokerUser(ENGINE_USER, ("resetkeys", "resetchannels", "~*", "&*", "+@all", *_NEVER),
                      "orchestration and recovery workers, beat, API, Flower")
