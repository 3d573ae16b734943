// A bounded FIFO for publishes made while there is no connection. Bounded
// because an app offline for an hour must not grow without limit; what is
// already accepted (a publish in flight when the socket died) goes back to the
// front even past the bound, since refusing it then would lose it silently.

export class BoundedQueue<T> {
  private items: T[] = [];

  constructor(readonly capacity: number) {}

  get length(): number {
    return this.items.length;
  }

  /** Appends `item`; false when the queue is full. */
  push(item: T): boolean {
    if (this.items.length >= this.capacity) return false;
    this.items.push(item);
    return true;
  }

  /** Puts `items` back at the front, in their order, whatever the bound. */
  requeueFront(items: T[]): void {
    this.items = items.concat(this.items);
  }

  /** Takes everything, oldest first. */
  drain(): T[] {
    const out = this.items;
    this.items = [];
    return out;
  }

  remove(item: T): boolean {
    const i = this.items.indexOf(item);
    if (i < 0) return false;
    this.items.splice(i, 1);
    return true;
  }
}
