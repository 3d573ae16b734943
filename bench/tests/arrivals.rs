//! The per-receiver loss accounting of `herald-bench` (`arrivals`), fed
//! crafted arrival sequences: it must find a missing and a duplicated
//! delivery even where the totals balance, and tell an overtaken message
//! that the publisher had ordered from two it sent concurrently.

use std::time::Duration;

use herald_bench::arrivals::{Arrival, Arrivals, Call, Due, Loss};

/// Receivers of one room, each given the numbers it got, in order.
fn arrivals(received: &[&[u64]]) -> Vec<Arrivals> {
    received
        .iter()
        .map(|seq| {
            let mut a = Arrivals::default();
            for &n in *seq {
                a.record(n);
            }
            a
        })
        .collect()
}

fn loss(received: &[&[u64]], due: &Due) -> Loss {
    let all = arrivals(received);
    Loss::of(all.iter().map(|a| (0, a)), due)
}

#[test]
fn a_duplicate_and_a_loss_that_balance_in_the_totals_are_both_found() {
    // Three receivers, five messages each: 15 deliveries arrived, as many
    // as were due, yet receiver 1 lacks message 2 and receiver 2 got
    // message 3 twice.
    let got: [&[u64]; 3] = [&[0, 1, 2, 3, 4], &[0, 1, 3, 4], &[0, 1, 2, 3, 3, 4]];
    assert_eq!(got.iter().map(|s| s.len()).sum::<usize>(), 15);
    let l = loss(&got, &Due::sequential(5));
    assert_eq!(l.receivers, 3);
    assert_eq!((l.missing, l.receivers_missing), (1, 1), "{l:?}");
    assert_eq!((l.duplicates, l.receivers_duplicated), (1, 1), "{l:?}");
    assert_eq!((l.out_of_order, l.order_broken), (0, Some(0)), "{l:?}");
    assert!(!l.clean());
}

#[test]
fn the_tail_and_the_head_count_as_missing_too() {
    // Nothing of 0..2 nor of 8..10 arrived: a receiver that starts late
    // or stops early.
    let l = loss(&[&[2, 3, 4, 5, 6, 7]], &Due::sequential(10));
    assert_eq!(l.missing, 4, "{l:?}");
    assert_eq!(l.out_of_order, 0);
    // Numbers the publisher never made are not due, and are not missing.
    let l = loss(&[&[0, 1, 2, 7]], &Due::sequential(3));
    assert_eq!((l.missing, l.unexpected), (0, 1), "{l:?}");
}

#[test]
fn a_late_message_fills_its_hole_and_a_second_copy_is_a_duplicate() {
    let mut a = Arrivals::default();
    let seq: Vec<Arrival> = [0, 3, 1, 2, 2, 4].iter().map(|&n| a.record(n)).collect();
    assert_eq!(
        seq,
        [
            Arrival::InOrder,
            Arrival::Skipped(2),
            Arrival::Late,
            Arrival::Late,
            Arrival::Duplicate,
            Arrival::InOrder,
        ]
    );
    assert!((0..5).all(|n| a.received(n)));
    assert_eq!((a.duplicates(), a.out_of_order()), (1, 2));
}

/// Publishes 0..4 to one room, one per call, made 10 ms apart; each
/// confirmed `confirm_after` after it was made.
fn calls(confirm_after: Duration) -> Vec<Call> {
    (0..4)
        .map(|i| {
            let sent = Duration::from_millis(10 * i);
            Call {
                ok: true,
                call: i,
                sent,
                confirmed: Some(sent + confirm_after),
            }
        })
        .collect()
}

#[test]
fn overtaking_breaks_the_order_only_if_the_publisher_had_ordered_the_two() {
    let overtaken: [&[u64]; 1] = [&[0, 2, 1, 3]];
    // Publish 1 was confirmed 5 ms after it was made, before publish 2 was
    // made: delivering 2 first breaks the order a system owes.
    let l = loss(
        &overtaken,
        &Due::from_calls(1, calls(Duration::from_millis(5))),
    );
    assert_eq!((l.out_of_order, l.order_broken), (1, Some(1)), "{l:?}");
    // Confirmed only 25 ms later, after 2 was made: the two were in flight
    // together, so either order is right.
    let l = loss(
        &overtaken,
        &Due::from_calls(1, calls(Duration::from_millis(25))),
    );
    assert_eq!((l.out_of_order, l.order_broken), (1, Some(0)), "{l:?}");
    // In one `PublishBatch` call they are ordered, however long it took.
    let batched: Vec<Call> = calls(Duration::from_millis(25))
        .into_iter()
        .map(|c| Call { call: 0, ..c })
        .collect();
    let l = loss(&overtaken, &Due::from_calls(1, batched));
    assert_eq!(l.order_broken, Some(1), "{l:?}");
    // A publisher that confirms nothing: counted, not judged.
    let l = loss(&overtaken, &Due::unordered(vec![4]));
    assert_eq!((l.out_of_order, l.order_broken), (1, None), "{l:?}");
}

#[test]
fn a_failed_publish_is_not_due_but_counts_if_it_arrives() {
    let mut c = calls(Duration::from_millis(5));
    c[2].ok = false;
    c[2].confirmed = None;
    let due = Due::from_calls(1, c);
    // Receiver 0 lacks only the failed one: nothing missing. Receiver 1
    // got it anyway (its outcome was unknown): not due, so unexpected.
    let l = loss(&[&[0, 1, 3], &[0, 1, 2, 3]], &due);
    assert_eq!((l.missing, l.unexpected), (0, 1), "{l:?}");
}

#[test]
fn rooms_number_their_own_messages() {
    // Publish i goes to room i % 2: room 0 has 0, 2, 4 (its 0, 1, 2),
    // room 1 has 1, 3 (its 0, 1).
    let due = Due::from_calls(2, (0..5).map(calls_at).collect());
    let room0 = arrivals(&[&[0, 1, 2]]);
    let room1 = arrivals(&[&[0]]);
    let l = Loss::of([(0, &room0[0]), (1, &room1[0])], &due);
    assert_eq!((l.receivers, l.missing, l.receivers_missing), (2, 1, 1));
}

fn calls_at(i: u64) -> Call {
    Call {
        ok: true,
        call: i,
        sent: Duration::from_millis(i),
        confirmed: Some(Duration::from_millis(i) + Duration::from_micros(500)),
    }
}
