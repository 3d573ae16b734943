// Where a durable room's stream stands for this client, and which messages
// are repeats. The server replays from `since` after a reconnect and may
// resend what the client already had (the inbox after `connected`, a
// publish retried with its key, a rejoin racing live delivery), so the
// client keeps the last offset it delivered and lets through only later ones.
// Offsets rise within an epoch; a new epoch means the history was
// recreated and old offsets mean nothing.

export interface Position {
  epoch: string;
  offset: number;
}

/** Whether a message at (`epoch`, `offset`) is new after `pos`, and the position after it. */
export function admit(
  pos: Position | undefined,
  epoch: string,
  offset: number,
): { deliver: boolean; next: Position | undefined } {
  if (pos !== undefined && pos.epoch === epoch && offset <= pos.offset) {
    return { deliver: false, next: pos };
  }
  return { deliver: true, next: { epoch, offset } };
}

/**
 * The position after a durable `join` was answered: the room's latest offset
 * when the join took effect. Messages up to it were either replayed before
 * the answer (and delivered) or published before this client's interest, so
 * the stream continues from there; a new epoch starts over.
 */
export function afterJoin(pos: Position | undefined, epoch: string, offset: number): Position | undefined {
  if (epoch === "") return pos; // ephemeral room: no positions
  if (pos === undefined || pos.epoch !== epoch || offset > pos.offset) return { epoch, offset };
  return pos;
}
