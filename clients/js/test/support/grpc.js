// Just enough of a gRPC client for tests to call Herald's server API
// (Router.Publish, SendToUser, Disconnect) without a gRPC library: unary calls
// over node:http2 with the few protobuf messages involved encoded by hand.

import http2 from "node:http2";

function varint(n) {
  const out = [];
  let v = BigInt(n);
  do {
    let b = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) b |= 0x80;
    out.push(b);
  } while (v > 0n);
  return Buffer.from(out);
}

/** Encodes `fields`: [number, "string" | "uint" | "bool", value], skipping undefined values. */
function encode(fields) {
  const parts = [];
  for (const [no, type, value] of fields) {
    if (value === undefined) continue;
    if (type === "string") {
      const bytes = Buffer.from(value, "utf8");
      parts.push(varint((no << 3) | 2), varint(bytes.length), bytes);
    } else {
      parts.push(varint(no << 3), varint(type === "bool" ? (value ? 1 : 0) : value));
    }
  }
  return Buffer.concat(parts);
}

/** Reads the top-level fields of a protobuf message: { [no]: string | number }. */
function decode(buf) {
  const out = {};
  let i = 0;
  const readVarint = () => {
    let shift = 0n;
    let v = 0n;
    for (;;) {
      const b = buf[i++];
      v |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
      shift += 7n;
    }
  };
  while (i < buf.length) {
    const tag = Number(readVarint());
    const no = tag >> 3;
    const wire = tag & 7;
    if (wire === 0) out[no] = Number(readVarint());
    else if (wire === 2) {
      const len = Number(readVarint());
      out[no] = buf.subarray(i, i + len).toString("utf8");
      i += len;
    } else throw new Error(`unexpected protobuf wire type ${wire}`);
  }
  return out;
}

/** One unary call; resolves with the reply's fields, rejects with the gRPC status and message. */
export function unary(addr, method, body) {
  return new Promise((resolve, reject) => {
    const client = http2.connect(`http://${addr}`);
    client.on("error", reject);
    const frame = Buffer.alloc(5 + body.length);
    frame.writeUInt8(0, 0);
    frame.writeUInt32BE(body.length, 1);
    body.copy(frame, 5);
    const req = client.request({
      ":method": "POST",
      ":path": `/herald.v1.Router/${method}`,
      "content-type": "application/grpc",
      te: "trailers",
    });
    const chunks = [];
    let status;
    let message = "";
    req.on("response", (h) => {
      if (h["grpc-status"] !== undefined) {
        status = Number(h["grpc-status"]);
        message = decodeURIComponent(h["grpc-message"] ?? "");
      }
    });
    req.on("trailers", (t) => {
      status = Number(t["grpc-status"]);
      message = decodeURIComponent(t["grpc-message"] ?? "");
    });
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      client.close();
      if (status !== 0) {
        const e = new Error(`${method}: gRPC status ${status}: ${message}`);
        e.status = status;
        reject(e);
        return;
      }
      const all = Buffer.concat(chunks);
      resolve(all.length >= 5 ? decode(all.subarray(5, 5 + all.readUInt32BE(1))) : {});
    });
    req.on("error", reject);
    req.end(frame);
  });
}

/** Router.Publish: `data` is any JSON value. Resolves { epoch, offset }. */
export async function publish(addr, room, data, key) {
  const r = await unary(addr, "Publish", encode([[1, "string", room], [2, "string", JSON.stringify(data)], [3, "string", key]]));
  return { epoch: r[1] ?? "", offset: r[2] ?? 0 };
}

/** Router.SendToUser into `user:<user>`. Resolves { epoch, offset }. */
export async function sendToUser(addr, user, data, key) {
  const r = await unary(addr, "SendToUser", encode([[1, "string", user], [2, "string", JSON.stringify(data)], [3, "string", key]]));
  return { epoch: r[1] ?? "", offset: r[2] ?? 0 };
}

/** Router.Disconnect of every connection of `user` (or of one `conn`). */
export async function disconnect(addr, { user, conn, code, reason, reconnect }) {
  await unary(
    addr,
    "Disconnect",
    encode([[1, "string", user], [2, "string", conn], [3, "uint", code], [4, "string", reason], [5, "bool", reconnect]]),
  );
}
