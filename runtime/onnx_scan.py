"""Read the external-data file names an ONNX file refers to, without the onnx package (lean runtime).

A minimal protobuf walk: ModelProto.graph(7) -> GraphProto.initializer(5) and sparse_initializer(15)
-> TensorProto.external_data(13) -> {key(1), value(2)}; subgraphs in node attributes (NodeProto.attribute(5)
-> AttributeProto.g(6) / graphs(11)) are walked too.
"""

from __future__ import annotations

from dataclasses import dataclass


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """Yield (field number, wire type, value) of one message; value is bytes for length-delimited fields."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = memoryview(buf)[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _external_data_entry(entry) -> tuple[str, str]:
    """One TensorProto.external_data entry (StringStringEntryProto): (key(1), value(2))."""
    strings = {f: bytes(v).decode("utf-8", "replace") for f, w, v in _fields(entry) if w == 2}
    return strings.get(1, ""), strings.get(2, "")


def _tensor_locations(tensor) -> set[str]:
    """Every ``location`` entry of a tensor's external data (all of them: a file listing two is checked
    for both)."""
    found = set()
    for field, wire, value in _fields(tensor):
        if field == 13 and wire == 2:
            key, location = _external_data_entry(value)
            if key == "location":
                found.add(location)
    return found


def _graph_locations(graph, depth=0) -> set[str]:
    if depth > 16:
        raise ValueError("subgraphs nested too deeply")
    found = set()
    for field, wire, value in _fields(graph):
        if wire != 2:
            continue
        if field == 5:  # initializer
            found |= _tensor_locations(value)
        elif field == 15:  # sparse_initializer: values(1), indices(2) are TensorProtos
            for f, w, v in _fields(value):
                if w == 2 and f in (1, 2):
                    found |= _tensor_locations(v)
        elif field == 1:  # node -> attribute(5) -> g(6) / graphs(11) / t(5) / tensors(10)
            for f, w, attr in _fields(value):
                if f == 5 and w == 2:
                    for af, aw, av in _fields(attr):
                        if aw == 2 and af in (6, 11):
                            found |= _graph_locations(av, depth + 1)
                        elif aw == 2 and af in (5, 10):
                            found |= _tensor_locations(av)
    return found


def external_data_locations(data: bytes) -> set[str]:
    """Every external-data ``location`` in a serialized ModelProto. Raises ValueError if it is not one."""
    found = set()
    for field, wire, value in _fields(data):
        if field == 7 and wire == 2:
            found |= _graph_locations(value)
    return found


@dataclass(frozen=True)
class ExternalTensor:
    """Where an initializer's data lies outside the graph file."""

    location: str
    offset: int
    length: int
    dims: tuple[int, ...]


def _external_tensor(tensor) -> tuple[str, ExternalTensor] | None:
    name, dims, entries = "", [], {}
    for field, wire, value in _fields(tensor):
        if field == 1 and wire == 0:  # dims, unpacked
            dims.append(value)
        elif field == 1 and wire == 2:  # dims, packed
            pos = 0
            while pos < len(value):
                d, pos = _varint(value, pos)
                dims.append(d)
        elif field == 8 and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif field == 13 and wire == 2:
            key, text = _external_data_entry(value)
            entries[key] = text
    if "location" not in entries:
        return None
    return name, ExternalTensor(
        entries["location"], int(entries.get("offset", 0)), int(entries.get("length", -1)), tuple(dims)
    )


def external_initializers(data: bytes) -> dict[str, ExternalTensor]:
    """The main graph's initializers stored as external data, by name. Raises ValueError if ``data`` is not a
    serialized ModelProto."""
    found = {}
    for field, wire, graph in _fields(data):
        if field == 7 and wire == 2:
            for f, w, tensor in _fields(graph):
                if f == 5 and w == 2:
                    entry = _external_tensor(tensor)
                    if entry:
                        found[entry[0]] = entry[1]
    return found
