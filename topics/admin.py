"""Create the declared topics if they are missing."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meterstream.topics import ALL_TOPICS, TopicSpec


async def ensure_topics(
    bootstrap: str,
    *,
    prefix: str = "",
    partitions: int,
    replication_factor: int = 1,
    specs: tuple[TopicSpec, ...] = ALL_TOPICS,
    **client_options: object,
) -> list[str]:
    """Create each missing topic; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=f"{prefix}{spec.name}",
                num_partitions=spec.partitions or partitions,
                replication_factor=replication_factor,
                topic_configs=spec.config(),
            )
            for spec in specs
            if f"{prefix}{spec.name}" not in existing
        ]
        if missing:
            await admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        await admin.close()
