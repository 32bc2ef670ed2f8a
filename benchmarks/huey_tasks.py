"""huey's side of the round-trip benchmark. huey runs functions by reference, so its consumer (a
separate ``huey_consumer`` process) imports this module: run.py passes the private redis-server's
URL in ``$NBQUEUE_BENCH_HUEY_URL`` to both processes."""

import inspect
import os

from huey import RedisHuey
from huey.storage import RedisStorage

URL_ENV = "NBQUEUE_BENCH_HUEY_URL"

url = os.environ.get(URL_ENV)
if not url:
    raise RuntimeError(f"${URL_ENV} is not set: run.py sets it to its private redis-server")

# Configured for low latency, as huey documents it:
# - blocking=True (RedisHuey's default, spelled out): the consumer waits for work in BRPOP, so
#   its polling delays (-d/--delay, -m/--max-delay, -b/--backoff) never apply.
# - notify_result=True (huey >= 3.0, off by default): Result.get(blocking=True) waits in BLPOP on
#   a notification key instead of polling the result hash every 50 ms * 1.15^k.
options = {"blocking": True}
if "notify_result" in inspect.signature(RedisStorage.__init__).parameters:
    options["notify_result"] = True
huey = RedisHuey("nbqueue-bench", url=url, **options)


@huey.task()
def noop(i):
    return i
