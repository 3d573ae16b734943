//! Exactly once and in order across reconnects: a durable room remembers
//! the last offset the application was given, asks for what came after it
//! when rejoining (`since`), and drops what the server sends again (an
//! inbox redelivered, a replay overlapping live messages). Pure, so every
//! case is tested without a server.

use super::types::{JoinOk, Message, Position};

/// Where the application is in one room's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Track {
    position: Option<Position>,
}

impl Track {
    /// The last durable message given to the application (or where the
    /// room stood when it was joined).
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// The application asked to join from `since`: what follows it is
    /// replayed, so nothing before it may drop a replayed message.
    pub fn start_from(&mut self, since: Position) {
        self.position = Some(since);
    }

    /// The `since` of a rejoin.
    pub fn since(&self) -> Option<Position> {
        self.position.clone()
    }

    /// Whether `message` is new to the application; if so it becomes the
    /// position. Messages of ephemeral rooms carry no offset and always
    /// pass; a message of another epoch starts that epoch's count (offsets
    /// of different epochs cannot be compared).
    pub fn accept(&mut self, message: &Message) -> bool {
        let Some(at) = message.position() else {
            return true;
        };
        match &mut self.position {
            Some(p) if p.epoch == at.epoch => {
                if at.offset <= p.offset {
                    return false;
                }
                p.offset = at.offset;
            }
            _ => self.position = Some(at),
        }
        true
    }

    /// A join was answered `ok`. Without `since`, the application starts at
    /// the room's latest offset. With it, the replay that follows carries
    /// the position on, unless the epoch changed: then nothing is replayed
    /// and the new epoch starts where the room stands.
    pub fn joined(&mut self, since: Option<&Position>, ok: &JoinOk) {
        if ok.epoch.is_empty() {
            self.position = None;
            return;
        }
        let here = Position {
            epoch: ok.epoch.clone(),
            offset: ok.offset,
        };
        match (since, &mut self.position) {
            // Messages of this epoch may have come before the answer.
            (_, Some(p)) if p.epoch == ok.epoch && since.is_none_or(|s| s.epoch != ok.epoch) => {
                p.offset = p.offset.max(ok.offset);
            }
            (Some(s), Some(p)) if s.epoch == ok.epoch && p.epoch == ok.epoch => {}
            (Some(s), _) if s.epoch == ok.epoch => self.position = Some(s.clone()),
            _ => self.position = Some(here),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(epoch: &str, offset: u64) -> Message {
        Message {
            room: "doc:1".into(),
            data: json!(offset),
            from: "ann".into(),
            ts: 0,
            epoch: Some(epoch.into()),
            offset: Some(offset),
            prev: None,
        }
    }

    fn pos(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    fn ok(epoch: &str, offset: u64) -> JoinOk {
        JoinOk {
            epoch: epoch.into(),
            offset,
            recovered: true,
            missed: 0,
        }
    }

    /// The stream an application sees from a stream with repeats.
    fn seen(track: &mut Track, stream: &[Message]) -> Vec<u64> {
        stream
            .iter()
            .filter(|m| track.accept(m))
            .map(|m| m.offset.unwrap())
            .collect()
    }

    #[test]
    fn repeats_are_dropped_and_the_order_kept() {
        let mut t = Track::default();
        t.joined(None, &ok("e", 10));
        // Live 11, 12; the connection dies; the rejoin replays from 12 on
        // but a redelivery overlaps: 11 and 12 again.
        let stream = [11, 12, 11, 12, 13, 15, 15, 20].map(|o| msg("e", o));
        assert_eq!(seen(&mut t, &stream), [11, 12, 13, 15, 20]);
        assert_eq!(t.since(), Some(pos("e", 20)));
    }

    #[test]
    fn a_first_join_starts_at_the_latest_offset() {
        let mut t = Track::default();
        t.joined(None, &ok("e", 7));
        assert_eq!(t.position(), Some(&pos("e", 7)));
        // Published before the join: not the application's.
        assert!(!t.accept(&msg("e", 6)));
        assert!(t.accept(&msg("e", 8)));
    }

    #[test]
    fn live_messages_before_the_join_answer_are_kept() {
        let mut t = Track::default();
        assert!(t.accept(&msg("e", 9)));
        t.joined(None, &ok("e", 8));
        assert_eq!(t.position(), Some(&pos("e", 9)));
        assert!(!t.accept(&msg("e", 9)));
    }

    #[test]
    fn a_rejoin_with_since_keeps_the_position_for_the_replay() {
        let mut t = Track::default();
        t.joined(None, &ok("e", 3));
        assert!(t.accept(&msg("e", 4)));
        let since = t.since().unwrap();
        // The room moved on to 9 while away: 5..=9 are replayed after the answer.
        t.joined(Some(&since), &ok("e", 9));
        assert_eq!(t.position(), Some(&pos("e", 4)));
        let stream = [5, 6, 7, 8, 9].map(|o| msg("e", o));
        assert_eq!(seen(&mut t, &stream), [5, 6, 7, 8, 9]);
    }

    #[test]
    fn an_explicit_since_replays_from_there() {
        let mut t = Track::default();
        t.start_from(pos("e", 2));
        assert!(t.accept(&msg("e", 3)));
        t.joined(Some(&pos("e", 2)), &ok("e", 5));
        assert_eq!(seen(&mut t, &[msg("e", 3), msg("e", 4)]), [4]);
    }

    #[test]
    fn a_new_epoch_starts_over() {
        let mut t = Track::default();
        t.joined(None, &ok("old", 50));
        let since = t.since().unwrap();
        t.joined(Some(&since), &ok("new", 2));
        assert_eq!(t.position(), Some(&pos("new", 2)));
        assert!(t.accept(&msg("new", 3)));
        // A message of yet another epoch is taken as it comes.
        assert!(t.accept(&msg("newer", 1)));
        assert_eq!(t.position(), Some(&pos("newer", 1)));
    }

    #[test]
    fn ephemeral_rooms_pass_everything() {
        let mut t = Track::default();
        t.joined(None, &ok("", 0));
        assert_eq!(t.since(), None);
        let m = Message {
            epoch: None,
            offset: None,
            ..msg("", 0)
        };
        assert!(t.accept(&m));
        assert!(t.accept(&m));
    }
}
