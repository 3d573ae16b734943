//! Which messages each receiver got, so that a step reports missing,
//! duplicated and out-of-order deliveries per receiver and per message,
//! not only totals (in which one receiver's duplicate cancels another's
//! loss).
//!
//! Every message a step publishes to a room has a number in that room (0,
//! 1, 2, ... in the order the publisher made them). A receiver's
//! [`Arrivals`] for a step keeps the highest number seen so far and the
//! numbers below it that have not arrived (as ranges, normally none): an
//! arrival in order costs one comparison and one increment, so that the
//! receivers' tap, which runs for every frame, stays as cheap as it was.
//!
//! An arrival below the highest number seen is either late (it fills a
//! hole: out of order) or a duplicate (it does not). Whether a late arrival
//! breaks an order the system promised depends on how the publisher made
//! the two messages: [`Due`] knows, and [`Loss::of`] sorts them.

use std::ops::Range;
use std::time::Duration;

use crate::report::Section;

/// One receiver's arrivals in one step, by message number in its room.
#[derive(Debug, Clone, Default)]
pub struct Arrivals {
    /// One past the highest number seen; every number below it has arrived
    /// unless it is in `holes`.
    next: u64,
    /// Numbers below `next` not seen (yet): sorted, disjoint, and never
    /// adjacent (a seen number lies between any two).
    holes: Vec<Range<u64>>,
    duplicates: u64,
    /// Late arrivals, each as `(n, the smallest and the highest number seen
    /// above n when it came)`: what [`Due::must_precede`] needs to tell a
    /// broken promise from two messages the publisher sent concurrently.
    late: Vec<(u64, u64, u64)>,
}

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The number after the highest one seen.
    InOrder,
    /// Above the highest one seen + 1: the numbers in between are missing
    /// (so far).
    Skipped(u64),
    /// Below the highest one seen, and not seen before.
    Late,
    /// Seen before.
    Duplicate,
}

impl Arrivals {
    /// Records message `n`.
    pub fn record(&mut self, n: u64) -> Arrival {
        if n == self.next {
            self.next += 1;
            return Arrival::InOrder;
        }
        if n > self.next {
            let skipped = n - self.next;
            self.holes.push(self.next..n);
            self.next = n + 1;
            return Arrival::Skipped(skipped);
        }
        // Below the highest: in a hole (late), or a duplicate.
        let at = self.holes.partition_point(|h| h.end <= n);
        match self.holes.get(at) {
            Some(h) if h.start <= n => {
                let hole = h.clone();
                // `hole.end` is seen (holes are never adjacent, and the last
                // one ends below `next`): the smallest number above `n` seen.
                self.late.push((n, hole.end, self.next - 1));
                match (hole.start == n, hole.end == n + 1) {
                    (true, true) => {
                        self.holes.remove(at);
                    }
                    (true, false) => self.holes[at].start = n + 1,
                    (false, true) => self.holes[at].end = n,
                    (false, false) => {
                        self.holes[at].end = n;
                        self.holes.insert(at + 1, n + 1..hole.end);
                    }
                }
                Arrival::Late
            }
            _ => {
                self.duplicates += 1;
                Arrival::Duplicate
            }
        }
    }

    /// Whether message `n` has arrived.
    pub fn received(&self, n: u64) -> bool {
        n < self.next && {
            let at = self.holes.partition_point(|h| h.end <= n);
            self.holes.get(at).is_none_or(|h| h.start > n)
        }
    }

    /// How many different numbers in `range` have arrived.
    fn received_in(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.next);
        if end <= range.start {
            return 0;
        }
        let unseen: u64 = self
            .holes
            .iter()
            .map(|h| h.end.min(end).saturating_sub(h.start.max(range.start)))
            .sum();
        end - range.start - unseen
    }

    /// Arrivals of a number seen before.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Arrivals after a higher number.
    pub fn out_of_order(&self) -> u64 {
        self.late.len() as u64
    }
}

/// One publish, as the publisher made it: what [`Due`] needs to know which
/// order the system owes its receivers.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// Whether it was confirmed (`ok`): only then is it due.
    pub ok: bool,
    /// The first publish of the call that carried it (a `PublishBatch`
    /// carries several, in order).
    pub call: u64,
    /// When the call was made, since the step began: before the system can
    /// have seen it.
    pub sent: Duration,
    /// When its confirmation was in hand (`None`: never), since the step
    /// began: after the system had it.
    pub confirmed: Option<Duration>,
}

/// What a step should have delivered: the messages of each room, which
/// of them are due, and which pairs the system had to keep in order.
pub struct Due {
    /// Per room: the messages numbered `0..count`.
    counts: Vec<u64>,
    /// Per room: the numbers not due (their publish failed), sorted.
    failed: Vec<Vec<u64>>,
    order: Order,
}

enum Order {
    /// Publish `i` is number `i / rooms` of room `i % rooms`.
    Calls { rooms: u64, calls: Vec<Call> },
    /// One writer in one stream: every pair is ordered.
    Sequential,
    /// The publisher does not say (e.g. Socket.IO's emitter, which has no
    /// confirmation): late arrivals are counted, not judged.
    Unknown,
}

impl Due {
    /// `calls[i]` is publish `i`, to room `i % rooms`.
    pub fn from_calls(rooms: usize, calls: Vec<Call>) -> Due {
        let rooms = rooms.max(1) as u64;
        let mut counts = vec![0u64; rooms as usize];
        let mut failed = vec![Vec::new(); rooms as usize];
        for (i, c) in calls.iter().enumerate() {
            let (room, n) = ((i as u64 % rooms) as usize, i as u64 / rooms);
            counts[room] = n + 1;
            if !c.ok {
                failed[room].push(n);
            }
        }
        Due {
            counts,
            failed,
            order: Order::Calls { rooms, calls },
        }
    }

    /// `counts[r]` messages to room `r`, all due, made by a publisher whose
    /// order is not known.
    pub fn unordered(counts: Vec<u64>) -> Due {
        let failed = vec![Vec::new(); counts.len()];
        Due {
            counts,
            failed,
            order: Order::Unknown,
        }
    }

    /// `count` messages to one room, written one after the other to each
    /// receiver: any late arrival breaks the order.
    pub fn sequential(count: u64) -> Due {
        Due {
            counts: vec![count],
            failed: vec![Vec::new()],
            order: Order::Sequential,
        }
    }

    /// Whether the system owes number `n` of `room` before every one of
    /// `above..=highest` (numbers a receiver saw first, `above` the smallest
    /// of them); `None` if the publisher's order is not known.
    ///
    /// With calls: yes when `n`'s publish was confirmed before the call of
    /// `highest` was made (calls are made in number order, so no other
    /// number in between was made earlier), or when `above` went in the
    /// same call as `n` (a call's messages are published in order, and the
    /// numbers of one call are consecutive in a room, so if any seen number
    /// shares `n`'s call, the smallest does).
    pub fn must_precede(&self, room: usize, n: u64, above: u64, highest: u64) -> Option<bool> {
        match &self.order {
            Order::Unknown => None,
            Order::Sequential => Some(true),
            Order::Calls { rooms, calls } => {
                let call = |m: u64| calls.get((m * rooms + room as u64) as usize);
                let (Some(late), Some(first), Some(last)) = (call(n), call(above), call(highest))
                else {
                    // Numbers the publisher never made: not ours to judge.
                    return Some(false);
                };
                Some(late.call == first.call || late.confirmed.is_some_and(|done| done < last.sent))
            }
        }
    }

    /// Deliveries due to one member of each room.
    fn due_in(&self, room: usize) -> u64 {
        let count = self.counts.get(room).copied().unwrap_or(0);
        count - self.failed.get(room).map_or(0, |f| f.len() as u64)
    }
}

/// Missing, duplicated and out-of-order deliveries of one step, over its
/// receivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loss {
    pub receivers: u64,
    /// Due messages that did not arrive, and at how many receivers.
    pub missing: u64,
    pub receivers_missing: u64,
    /// Arrivals of a message a receiver already had.
    pub duplicates: u64,
    pub receivers_duplicated: u64,
    /// Arrivals after a higher-numbered message.
    pub out_of_order: u64,
    pub receivers_out_of_order: u64,
    /// Out-of-order arrivals of messages the system had to deliver first
    /// ([`Due::must_precede`]); `None` when the publisher's order is not
    /// known.
    pub order_broken: Option<u64>,
    /// Messages that arrived but were not due (a failed publish, a number
    /// never made).
    pub unexpected: u64,
}

impl Loss {
    /// Adds one receiver of `room` with its `arrivals` in a step that
    /// should have delivered `due`.
    fn add(&mut self, room: usize, arrivals: &Arrivals, due: &Due) {
        let count = due.counts.get(room).copied().unwrap_or(0);
        let failed = due.failed.get(room).map_or(&[][..], Vec::as_slice);
        let failed_received = failed.iter().filter(|&&n| arrivals.received(n)).count() as u64;
        let got = arrivals.received_in(0..count) - failed_received;
        let missing = due.due_in(room) - got;
        self.receivers += 1;
        self.missing += missing;
        self.receivers_missing += u64::from(missing > 0);
        self.duplicates += arrivals.duplicates;
        self.receivers_duplicated += u64::from(arrivals.duplicates > 0);
        self.out_of_order += arrivals.out_of_order();
        self.receivers_out_of_order += u64::from(!arrivals.late.is_empty());
        if let Some(broken) = &mut self.order_broken {
            *broken += arrivals
                .late
                .iter()
                .filter(|&&(n, above, highest)| {
                    due.must_precede(room, n, above, highest) == Some(true)
                })
                .count() as u64;
        }
        self.unexpected += arrivals.received_in(count..u64::MAX) + failed_received;
    }

    /// The loss of `receivers`, each `(room, arrivals)`.
    pub fn of<'a>(receivers: impl IntoIterator<Item = (usize, &'a Arrivals)>, due: &Due) -> Loss {
        let mut loss = Loss {
            order_broken: (!matches!(due.order, Order::Unknown)).then_some(0),
            ..Loss::default()
        };
        for (room, arrivals) in receivers {
            loss.add(room, arrivals, due);
        }
        loss
    }

    /// Whether every due message arrived once, in order, and nothing else.
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.out_of_order == 0 && self.unexpected == 0
    }

    /// `section` with these figures (each count, and at how many
    /// receivers).
    pub fn put_into(&self, section: Section) -> Section {
        section
            .put("missing", self.missing)
            .put("receivers_missing", self.receivers_missing)
            .put("duplicates", self.duplicates)
            .put("receivers_duplicated", self.receivers_duplicated)
            .put("out_of_order", self.out_of_order)
            .put("receivers_out_of_order", self.receivers_out_of_order)
            .put("order_broken", self.order_broken)
            .put("unexpected", self.unexpected)
    }

    /// One line for a report's notes or failures, e.g. `3 missing at 2 of
    /// 100 receivers, 1 duplicated at 1`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let of = |n: u64, at: u64, what: &str| {
            format!("{n} {what} at {at} of {} receivers", self.receivers)
        };
        if self.missing > 0 {
            parts.push(of(self.missing, self.receivers_missing, "missing"));
        }
        if self.duplicates > 0 {
            parts.push(of(self.duplicates, self.receivers_duplicated, "duplicated"));
        }
        if self.out_of_order > 0 {
            let mut s = of(
                self.out_of_order,
                self.receivers_out_of_order,
                "out of order",
            );
            match self.order_broken {
                Some(b) => s.push_str(&format!(" ({b} against the publisher's order)")),
                None => s.push_str(" (the publisher's order is not known)"),
            }
            parts.push(s);
        }
        if self.unexpected > 0 {
            parts.push(format!("{} not due", self.unexpected));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_split_and_close() {
        let mut a = Arrivals::default();
        for n in [0, 5] {
            a.record(n);
        }
        assert_eq!(a.holes, vec![1..5]);
        assert_eq!(a.record(3), Arrival::Late);
        assert_eq!(a.holes, vec![1..3, 4..5]);
        assert_eq!(a.record(1), Arrival::Late);
        assert_eq!(a.record(4), Arrival::Late);
        assert_eq!(a.record(2), Arrival::Late);
        assert!(a.holes.is_empty());
        assert_eq!(a.record(2), Arrival::Duplicate);
        assert_eq!(a.received_in(0..6), 6);
        assert_eq!(a.received_in(0..100), 6);
    }
}
