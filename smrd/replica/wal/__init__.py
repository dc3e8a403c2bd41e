"""The replica's write-ahead log on disk: segment files of checksummed records, group commit,
recovery on start, compression and truncation of closed segments.

Owns: bytes on disk and what can be read back from them. Never: decides what to persist or when
(smrd.protocol.ready says which records must be durable before which messages leave).
"""
