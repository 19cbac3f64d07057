"""A chunk: the KV of one token span plus the header that proves what it is.

In memory a :class:`Chunk` holds its payload as a tensor. On disk or on the
wire it is ``encode``-d into one little-endian binary format (version 2)::

    fixed header (192 bytes) | token ids (u32 each) | body

offset size field
     0    4 magic b"KVTC"
     4    2 u16 format version (2)
     6    2 u16 flags: bit 0 has a parent; bit 1 carries a keyed MAC; bit 2
            the body is encrypted (needs bit 1); bits 3-15 reserved, zero
     8    4 u32 token count n (at most MAX_TOKENS)
    12    1 layout dtype (float32 1, float16 2, bfloat16 3)
    13    1 codec base stage id (raw 1, fp16 2, bf16 3, fp8 5, int4 8, int8 9)
    14    1 codec lossless stage id (none 0, zstd 1, lz4 2)
    15    1 shuffle element size before the lossless stage (1: none)
    16    4 u32 layers
    20    4 u32 kv heads
    24    4 u32 head dim
    28    4 reserved, zero
    32    8 u64 base stage output length (what the lossless stage holds)
    40    8 u64 body length
    48   32 key
    80   32 parent key (zero without a parent)
   112   32 namespace digest
   144   32 keyed MAC (flag bit 1; zero without it): keyed BLAKE3 of the whole
            chunk with these 32 bytes left out (:mod:`kvtier.security`)
   176   16 xxh3-128 digest (xxhash's big-endian bytes) of bytes 0..175 with
            the MAC field zeroed, the token ids and the body
   192   4n token ids
 192+4n     body (``payload_len`` bytes); encrypted (bit 2): a 12-byte nonce,
            the AES-256-GCM ciphertext of the codec's output, its 16-byte tag

The body is the codec's output with no frame of its own (``raw``: the
payload's own bytes, written and read without a copy). A reader decodes
whatever codec the header names, whatever codec it writes with itself.

:func:`decode_header` checks every field it can before anything is
allocated: magic, version and flags, the token count, ids and layout, and
the claimed lengths against the layout and codec (exact for raw and
uncompressed codecs; between the lossless format's own bounds otherwise),
with the decoded payload at most MAX_PAYLOAD_BYTES. :func:`decode_payload`
checks the body's length and the checksum, which covers every header byte
too, then decodes. Another format version (an older kvtier's JSON-header
chunks among them) or unknown flags raise :class:`ChunkVersionError`, a
:class:`ChunkFormatError`: a counted miss, never a guess and never a reader
for old formats (a cache's data is recomputable, and one reader is less code
and less surface for a crafted file). :meth:`Chunk.mismatch` then checks that
a chunk is the one the caller asked for (key, tokens, namespace, layout).

Shared tiers read and write under a :class:`~kvtier.security.ChunkPolicy`:
``decode_header`` then also refuses a header whose namespace, layout or
token count is not one this process's engines use (before anything is
allocated), and with a secret one without a MAC flag or without a key for
its namespace (:class:`ChunkAuthError`); ``decode_payload`` verifies the
checksum, then the MAC, before any decoding (so damage counts as corrupt,
a forgery as forged). The checksum is computed with
the MAC field zeroed, and the MAC over the chunk with that field left out
(the checksum included), so a chunk signed or not has the same checksum and
an unsigned chunk of an older kvtier still reads where no secret is set.

With a policy that encrypts, the body (the KV) is AES-256-GCM encrypted with
the tenant's encryption key, bound to the chunk's key and namespace; checksum
and MAC cover the ciphertext, so both are checked before anything is
decrypted. The header and the token ids stay in clear (see docs/security.md).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from kvtier.codec import Codec, CodecError, codec_from_ids
from kvtier.errors import ChunkAuthError, ChunkFormatError, ChunkVersionError
from kvtier.keys import DIGEST_SIZE, ChunkKey
from kvtier.layout import KVLayout
from kvtier.security import AEAD_OVERHEAD, MAC_LEN, MAC_OFFSET, ChunkAuthenticator, ChunkCipher, ChunkPolicy

MAGIC = b"KVTC"
VERSION = 2
FLAG_PARENT = 1
FLAG_MAC = 2
FLAG_ENCRYPTED = 4
KNOWN_FLAGS = FLAG_PARENT | FLAG_MAC | FLAG_ENCRYPTED
MAX_TOKENS = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 31  # decoded payload bytes a header may claim
CODEC_RAW = "raw"
RAW_IDS = (1, 0)  # base stage id of raw, no lossless stage

_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, token count
_FIELDS = struct.Struct(f"<4sHHIBBBBIIIIQQ{DIGEST_SIZE}s{DIGEST_SIZE}s32s32s")  # everything before the checksum
_CHECKSUM = struct.Struct("16s")
HEADER_BYTES = _FIELDS.size + _CHECKSUM.size  # 192
PREFIX_BYTES = _PREFIX.size
_DTYPE_IDS = {"float32": 1, "float16": 2, "bfloat16": 3}
_DTYPES = {v: k for k, v in _DTYPE_IDS.items()}
_ZERO = bytes(32)
assert _FIELDS.size == 176 and HEADER_BYTES == 192 and MAC_OFFSET + MAC_LEN == _FIELDS.size


def payload_checksum(data: memoryview | bytes) -> str:
    """xxh3-128 of ``data`` as ``"xxh3_128:<hex>"`` (the hash the header's checksum is made of)."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


def _checksum(fields: bytes | memoryview, tokens: bytes | memoryview, body: memoryview | bytes) -> bytes:
    """The header's checksum: one xxh3-128 pass over the fields (MAC field zeroed), the token ids and the body."""
    h = xxhash.xxh3_128(fields[:MAC_OFFSET])
    h.update(_ZERO)
    h.update(tokens)
    h.update(body)
    return h.digest()


@dataclass(frozen=True, eq=False)
class Chunk:
    """The KV of tokens [start, start+n) of some prefix.

    ``payload`` is [L, 2, H, n, D] in ``layout.dtype``, contiguous. A chunk is
    immutable by contract: nobody writes into ``payload`` after construction,
    so tiers and readers may share it without copying.
    """

    key: ChunkKey
    parent: ChunkKey | None
    namespace: bytes
    layout: KVLayout
    tokens: np.ndarray  # [n] uint32
    payload: torch.Tensor
    codec: str = CODEC_RAW

    def __post_init__(self) -> None:
        expected = self.layout.chunk_shape(len(self.tokens))
        if tuple(self.payload.shape) != expected or self.payload.dtype != self.layout.torch_dtype:
            raise ValueError(
                f"payload {tuple(self.payload.shape)} {self.payload.dtype} does not fit {expected} {self.layout.dtype}"
            )
        if not self.payload.is_contiguous():
            raise ValueError("chunk payload must be contiguous")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes this chunk occupies in memory (payload plus token ids)."""
        return self.payload.nbytes + self.tokens.nbytes

    def mismatch(self, key: ChunkKey, tokens: np.ndarray, namespace: bytes, layout: KVLayout) -> str | None:
        """Why this chunk is not the expected one, or None if it is."""
        if self.key != key:
            return "key"
        if self.namespace != namespace:
            return "namespace"
        if self.layout.payload != layout.payload:  # the attention kinds are in the namespace digest
            return "layout"
        if not np.array_equal(self.tokens, tokens):
            return "tokens"
        return None


def payload_view(chunk: Chunk) -> memoryview:
    """The payload's bytes without copying (valid while ``chunk`` lives)."""
    return memoryview(chunk.payload.view(torch.uint8).reshape(-1).numpy())


def encode_parts(
    chunk: Chunk, codec: Codec | None = None, *, policy: ChunkPolicy | None = None
) -> tuple[bytes, memoryview | bytes]:
    """(header + token ids, body) of the stored form of ``chunk``.

    Without a codec, or with ``raw``, the body is a view of the chunk's own
    memory (no copy; valid while the chunk lives). Otherwise it is the codec's
    output (new bytes). CPU cost: one checksum pass, plus the codec's encode;
    with a signing ``policy`` one keyed BLAKE3 pass more (the tenant's MAC in
    the header). Raises ValueError if the codec cannot encode the payload, the
    chunk does not fit the format (namespace digest size, more than
    MAX_TOKENS), or the policy signs and has no key for its namespace.
    """
    layout, n = chunk.layout, chunk.num_tokens
    auth: ChunkAuthenticator | None = None
    cipher: ChunkCipher | None = None
    if policy is not None and policy.signs:
        expected = policy.expected(chunk.namespace)
        if expected is None or expected.auth is None:
            raise ValueError("no MAC key for this chunk's namespace (no engine of this process registered it)")
        auth = expected.auth
        cipher = expected.cipher if policy.encrypts else None
    if len(chunk.namespace) != DIGEST_SIZE:
        raise ValueError(f"namespace digest must be {DIGEST_SIZE} bytes, got {len(chunk.namespace)}")
    if n > MAX_TOKENS or n * layout.bytes_per_token > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a chunk of {n} tokens is larger than the format allows")
    if codec is None or codec.name == CODEC_RAW:
        body: memoryview | bytes = payload_view(chunk)
        (base_id, lossless_id), shuffle, stage_len = RAW_IDS, 1, len(body)
    else:
        shape, dtype = layout.chunk_shape(n), layout.torch_dtype
        body = codec.encode(chunk.payload)
        base_id, lossless_id = codec.base_id, codec.lossless_id
        shuffle, stage_len = codec.shuffle_size(dtype), codec.stage_size(shape, dtype)
    if cipher is not None:
        body = cipher.encrypt(body, _aad(chunk.key.digest, chunk.namespace))
    fields = _FIELDS.pack(
        MAGIC,
        VERSION,
        (FLAG_PARENT if chunk.parent is not None else 0)
        | (FLAG_MAC if auth is not None else 0)
        | (FLAG_ENCRYPTED if cipher is not None else 0),
        n,
        _DTYPE_IDS[layout.dtype],
        base_id,
        lossless_id,
        shuffle,
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        0,
        stage_len,
        len(body),
        chunk.key.digest,
        chunk.parent.digest if chunk.parent is not None else _ZERO,
        chunk.namespace,
        _ZERO,
    )
    tokens = chunk.tokens.astype("<u4", copy=False).tobytes()
    checksum = _checksum(fields, tokens, body)
    head = b"".join((fields, checksum, tokens))
    if auth is not None:
        head = b"".join((head[:MAC_OFFSET], auth.sign(head, body), head[MAC_OFFSET + MAC_LEN :]))
    return head, body


def encode(chunk: Chunk, codec: Codec | None = None, *, policy: ChunkPolicy | None = None) -> bytes:
    """The whole encoded chunk as one bytes object."""
    header, body = encode_parts(chunk, codec, policy=policy)
    return b"".join((header, body))  # one copy of the body


@dataclass(frozen=True)
class ChunkHeader:
    """A parsed, validated header; ``offset`` is where the body starts in the encoded bytes.

    ``codec`` is the canonical spec of the codec that wrote the body
    (``"raw"``, ``"int8+zstd"``…); ``payload_len`` is the body's length.
    ``checksum`` and ``mac`` are not verified yet (they cover the body): :func:`decode_payload` does that,
    with ``auth`` (set when the header was read under a signing policy).
    """

    key: ChunkKey
    parent: ChunkKey | None
    namespace: bytes
    layout: KVLayout
    codec: str
    tokens: np.ndarray
    payload_len: int
    checksum: bytes
    offset: int
    head: bytes = field(repr=False)  # the header bytes and token ids, as read: the checksum covers them
    decoder: Codec | None = field(default=None, repr=False)  # None for raw
    mac: bytes = field(default=bytes(MAC_LEN), repr=False)
    auth: ChunkAuthenticator | None = field(default=None, repr=False)  # verifies ``mac`` in decode_payload
    cipher: ChunkCipher | None = field(default=None, repr=False)  # set for an encrypted body: decrypts it


def header_length(prefix: bytes | memoryview) -> int:
    """Bytes of header + token ids (where the body starts), read from the first ``PREFIX_BYTES`` of a chunk.

    Raises ChunkVersionError for another format version or unknown flags, ChunkFormatError for
    anything else that is not the start of a chunk.
    """
    if len(prefix) < 6:
        raise ChunkFormatError("truncated before header")
    magic, version = bytes(prefix[:4]), int.from_bytes(prefix[4:6], "little")
    if magic != MAGIC:
        raise ChunkFormatError("bad magic")
    if version != VERSION:
        raise ChunkVersionError(f"unsupported chunk format version {version} (this kvtier reads {VERSION})")
    if len(prefix) < _PREFIX.size:
        raise ChunkFormatError("truncated before header")
    _, _, flags, n = _PREFIX.unpack_from(prefix)
    if flags & ~KNOWN_FLAGS:
        raise ChunkVersionError(f"unsupported chunk format flags {flags:#06x}")
    if n > MAX_TOKENS:
        raise ChunkFormatError(f"header claims {n} tokens (at most {MAX_TOKENS})")
    return HEADER_BYTES + 4 * n


def decode_header(prefix: bytes | memoryview, *, policy: ChunkPolicy | None = None) -> ChunkHeader:
    """Parse and validate the header at the start of ``prefix``; raise ChunkFormatError if it is not one.

    Nothing is allocated from the header's claims except the token ids it
    holds; every length it states is checked against its layout and codec.
    With ``policy``: its namespace, layout and token count must be a
    registered namespace's (once any is), and with a secret it must carry a
    MAC flag and its namespace a key (else :class:`ChunkAuthError`).
    """
    end = header_length(prefix)
    if len(prefix) < end:
        raise ChunkFormatError("truncated header")
    fields = _FIELDS.unpack_from(prefix)
    flags, n, dtype_id, base_id, lossless_id, shuffle, layers, heads, dim, reserved, stage_len, body_len = fields[2:14]
    key, parent, namespace, mac = fields[14:]
    if reserved or (mac != _ZERO and not flags & FLAG_MAC) or (not flags & FLAG_PARENT and parent != _ZERO):
        raise ChunkFormatError("reserved header bytes are not zero")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted and not flags & FLAG_MAC:
        raise ChunkFormatError("an encrypted chunk without a MAC")
    if dtype_id not in _DTYPES:
        raise ChunkFormatError(f"unknown dtype id {dtype_id}")
    try:
        layout = KVLayout(layers, heads, dim, _DTYPES[dtype_id])
    except ValueError as exc:
        raise ChunkFormatError(f"malformed header: {exc}") from exc
    auth = _admit(policy, namespace, layout, n, flags) if policy is not None else None
    cipher = None
    if encrypted:
        expected_ns = policy.expected(namespace) if policy is not None and auth is not None else None
        cipher = expected_ns.cipher if expected_ns is not None else None
        if cipher is None:
            raise ChunkAuthError("an encrypted chunk, and no key for it here (no secret configured)")
    size = n * layout.bytes_per_token  # Python ints: no overflow
    if size > MAX_PAYLOAD_BYTES:
        raise ChunkFormatError(f"header claims a {size}-byte payload (at most {MAX_PAYLOAD_BYTES})")
    decoder, name, expected = None, CODEC_RAW, (size, 1, size, size)  # stage length, shuffle, least, most body
    if (base_id, lossless_id) != RAW_IDS:
        try:
            decoder = codec_from_ids(base_id, lossless_id)
        except (CodecError, ValueError) as exc:  # ValueError: the lossless stage's package is missing
            raise ChunkFormatError(f"unknown codec: {exc}") from exc
        if n == 0:
            raise ChunkFormatError(f"a zero-token chunk under codec {decoder.name}")
        shape, dtype = layout.chunk_shape(n), layout.torch_dtype
        name = decoder.name
        expected = (decoder.stage_size(shape, dtype), decoder.shuffle_size(dtype), *decoder.body_bounds(shape, dtype))
    if (stage_len, shuffle) != expected[:2]:
        raise ChunkFormatError(f"header says {stage_len} bytes shuffled by {shuffle}; {name} makes {expected[:2]}")
    if encrypted:
        expected = (*expected[:2], expected[2] + AEAD_OVERHEAD, expected[3] + AEAD_OVERHEAD)
    if not expected[2] <= body_len <= expected[3]:
        raise ChunkFormatError(f"payload length {body_len} does not match layout and codec {name} {expected[2:]}")
    return ChunkHeader(
        key=ChunkKey(key),
        parent=ChunkKey(parent) if flags & FLAG_PARENT else None,
        namespace=namespace,
        layout=layout,
        codec=name,
        tokens=np.frombuffer(prefix, dtype="<u4", count=n, offset=HEADER_BYTES).copy(),
        payload_len=body_len,
        checksum=_CHECKSUM.unpack_from(prefix, _FIELDS.size)[0],
        offset=end,
        head=bytes(prefix[:end]),
        decoder=decoder,
        mac=mac,
        auth=auth,
        cipher=cipher,
    )


def _aad(key: bytes, namespace: bytes) -> bytes:
    """The associated data of an encrypted body: the chunk's key and namespace (a body moved elsewhere fails)."""
    return b"kvtier chunk body v1\x00" + key + namespace


def _admit(policy: ChunkPolicy, namespace: bytes, layout: KVLayout, n: int, flags: int) -> ChunkAuthenticator | None:
    """Check a header against ``policy``; the authenticator its MAC must verify with (None: not signing)."""
    expected = policy.expected(namespace)
    if expected is not None:
        if layout != expected.layout:
            raise ChunkFormatError(f"header layout {layout} is not this namespace's {expected.layout}")
        if n > expected.max_tokens:
            raise ChunkFormatError(f"header claims {n} tokens, chunks here hold at most {expected.max_tokens}")
    elif policy.strict:
        raise ChunkAuthError("chunk of a namespace no engine here uses")
    if not policy.signs:
        return None
    if not flags & FLAG_MAC:
        raise ChunkAuthError("chunk carries no MAC and a secret is configured")
    if expected is None or expected.auth is None:
        raise ChunkAuthError("no MAC key for the chunk's namespace")
    return expected.auth


def decode_payload(header: ChunkHeader, payload: bytearray | memoryview | bytes) -> Chunk:
    """Build a chunk from its header and body bytes, verifying length and checksum.

    With the ``raw`` codec the returned tensor shares ``payload`` (no copy), so
    the chunk keeps that memory alive; read-only memory (``bytes`` received
    from a network client) is shared too, which is safe because a chunk's
    payload is never written (see :class:`Chunk`).
    """
    if len(payload) != header.payload_len:
        raise ChunkFormatError(f"payload is {len(payload)} bytes, header says {header.payload_len}")
    head = memoryview(header.head)
    # the checksum first: damage (a flipped bit, a torn write) is told apart from a forgery, and it is cheap
    if _checksum(head[: _FIELDS.size], head[HEADER_BYTES:], payload) != header.checksum:
        raise ChunkFormatError("checksum mismatch")
    if header.auth is not None and not header.auth.verify(head, header.mac, payload):
        raise ChunkAuthError("MAC mismatch: not written with this tenant's key")
    if header.cipher is not None:
        plain = header.cipher.decrypt(payload, _aad(header.key.digest, header.namespace))
        if plain is None:
            raise ChunkAuthError("encrypted body does not open with this tenant's keys")
        payload = plain
    dtype = header.layout.torch_dtype
    shape = header.layout.chunk_shape(len(header.tokens))
    if header.decoder is None:
        if not len(payload):
            flat = torch.empty(0, dtype=dtype)
        else:
            with warnings.catch_warnings():  # torch warns on read-only buffers; chunks are never written
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(payload, dtype=dtype)
        tensor = flat.view(shape)
    else:
        try:
            tensor = header.decoder.decode(payload, shape, dtype)
        except (CodecError, ValueError) as exc:
            raise ChunkFormatError(f"{header.codec} payload does not decode: {exc}") from exc
    return Chunk(
        key=header.key,
        parent=header.parent,
        namespace=header.namespace,
        layout=header.layout,
        tokens=header.tokens,
        payload=tensor,
        codec=header.codec,
    )


def decode(data: bytes | bytearray, *, policy: ChunkPolicy | None = None) -> Chunk:
    """Decode a whole encoded chunk (copies ``data`` if it is immutable bytes)."""
    header = decode_header(memoryview(data), policy=policy)
    body = memoryview(data if isinstance(data, bytearray) else bytearray(data))[header.offset :]
    return decode_payload(header, body)
