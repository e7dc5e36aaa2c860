"""A queued group inside the buffer: its metadata plus the group as objects or msgpack bytes, each made from the
other on demand (groups arrive as bytes on the production path and are decoded only where the buffer needs the
samples: a user filter, a regeneration)."""

from __future__ import annotations

from streamrl.types import Group
from streamrl.wire import GroupMeta, decode_group, encode_group, meta_of


class Entry:
    """A queued group: its meta plus the group as objects or bytes."""

    __slots__ = ("meta", "_group", "_raw")

    def __init__(self, meta: GroupMeta, group: Group | None = None, raw: bytes | None = None) -> None:
        if group is None and raw is None:
            raise ValueError("an entry needs the group or its bytes")
        self.meta, self._group, self._raw = meta, group, raw

    @classmethod
    def of(cls, group: Group) -> Entry:

        return cls(meta_of(group), group=group)

    @property
    def gid(self) -> str:
        return self.meta.gid

    @property
    def group(self) -> Group:
        """The samples (decoded once from the bytes if the group arrived encoded)."""
        if self._group is None:
            self._group = decode_group(self.raw)
        return self._group

    @property
    def raw(self) -> bytes:
        """The msgpack bytes of the group (encoded once if it arrived as objects)."""
        if self._raw is None:
            self._raw = encode_group(self._group)
        return self._raw

    def snapshot(self) -> Entry:
        """A copy without the objects: its `group` decodes fresh ones (replay must not share mutables)."""
        return Entry(self.meta, raw=self.raw)
