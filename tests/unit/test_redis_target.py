"""SDFARM_REDIS_URL: one server or a Sentinel group, parsed once, with exact errors that never quote
the URL; the options Celery's transport and RedBeat get from it."""

from __future__ import annotations

import pytest
from kombu import Connection
from redis.sentinel import SentinelConnectionPool

from sdfarm.queue import make_celery
from sdfarm.redis_target import RedisTarget
from sdfarm.settings import Settings

GROUP = "sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_a_plain_url_is_one_server() -> None:
    target = RedisTarget.parse("redis://:pw@redis:6379/0")
    assert not target.is_sentinel
    assert target.transport_options() == {}
    assert target.redbeat_conf() == {"redbeat_redis_url": "redis://:pw@redis:6379/0", "redbeat_redis_options": {}}
    assert target.client().connection_pool.connection_kwargs["host"] == "redis"


def test_a_sentinel_url_names_every_sentinel_and_the_masters_password_and_database() -> None:
    target = RedisTarget.parse(GROUP, "farm", "sentinel-pw")
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (target.master, target.password, target.db, target.sentinel_password) == ("farm", "s@cret", 2, "sentinel-pw")
    client = target.client()  # no connection yet: the pool asks the sentinels on the first command
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "farm"
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("s@cret", 2)
    assert [s.connection_pool.connection_kwargs["password"] for s in pool.sentinel_manager.sentinels] == \
        ["sentinel-pw"] * 3


def test_celery_and_redbeat_follow_the_sentinels() -> None:
    settings = Settings(redis_url=GROUP, redis_sentinel_master="farm", redis_sentinel_password="sentinel-pw")
    app = make_celery(settings)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "farm"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert options["priority_steps"] == list(range(10))  # the farm's own options are kept
    with Connection(app.conf.broker_url, transport_options=options) as conn:
        assert conn.transport_cls == "sentinel"
        assert [u.split("@")[-1].removeprefix("sentinel://") for u in conn.alt] == [
            "10.0.0.1:26379/2", "10.0.0.2", "10.0.0.3:26380"]
    conf = RedisTarget.from_settings(settings).redbeat_conf()
    assert conf["redbeat_redis_url"].startswith("redis-sentinel")
    assert conf["redbeat_redis_options"]["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26379),
                                                          ("10.0.0.3", 26380)]
    assert (conf["redbeat_redis_options"]["service_name"], conf["redbeat_redis_options"]["password"]) == \
        ("farm", "s@cret")


@pytest.mark.parametrize(("url", "master", "message"), [
    ("http://localhost:6379", "m", "SDFARM_REDIS_URL is not a Redis URL: it must start with redis://, rediss://,"
                                   " unix:// or sentinel://"),
    ("redis://:sec/ret@localhost:x/0", "m", "SDFARM_REDIS_URL is not a Redis URL: it does not parse"),
    ("sentinel://:pw@h1:26379", "", "SDFARM_REDIS_SENTINEL_MASTER is empty: a sentinel:// URL needs the name of"
                                    " the master the sentinels monitor"),
    ("sentinel://:pw@h1:26379;redis://h2:6379", "m", "SDFARM_REDIS_URL: sentinel 2 is not sentinel://HOST[:PORT]"),
    ("sentinel://:pw@h1:port", "m", "SDFARM_REDIS_URL: sentinel 1 does not parse"),
    ("sentinel://:pw@h1:26379;sentinel://", "m", "SDFARM_REDIS_URL: sentinel 2 is not sentinel://HOST[:PORT]"),
    ("sentinel://:pw@h1:26379/zero", "m", "SDFARM_REDIS_URL: the database must be a number"),
])
def test_a_wrong_url_is_named_without_its_secret(url: str, master: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^SDFARM_REDIS_") as e:
        RedisTarget.parse(url, master)
    assert str(e.value).startswith(message)
    assert "pw" not in str(e.value)
    assert "sec/ret" not in str(e.value)
