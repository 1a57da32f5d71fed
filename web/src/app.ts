// What every page gets, and small shared pieces.

import type { Role, Whoami } from "./api";

export interface Ctx {
  me: Whoami;
  role: Role;
  /** Path parameters, e.g. the agent name. */
  params: Record<string, string>;
  query: URLSearchParams;
  /** Sets the document title ("… · gatekey"). */
  title(t: string): void;
}

/** Renders into `root`; returns what to do when the page is left. */
export type Page = (root: HTMLElement, ctx: Ctx) => (() => void) | void;

/** Calls `f` now and every `ms` while the tab is visible; returns a stop function. */
export function poll(f: () => Promise<void> | void, ms: number): () => void {
  let stopped = false;
  let timer: number | undefined;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await f();
      } catch {
        // f shows its own errors.
      }
    }
    if (!stopped) timer = window.setTimeout(tick, ms);
  };
  void tick();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}

export function navigate(hash: string): void {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}

/**
 * A redraw for a live-updating region: skipped when nothing changed
 * (`sig`), put off while a pointer is pressed (so a poll never swallows a
 * click), and keeping the keyboard focus on the control with the same
 * `data-key`. Call `dispose` when the page is left.
 */
export function redrawer(el: HTMLElement, draw: () => void): { redraw: (sig: string) => void; dispose: () => void } {
  let last: string | null = null;
  let pressing = false;
  let pending: string | null = null;
  const run = (sig: string) => {
    if (sig === last) return;
    if (pressing) {
      pending = sig;
      return;
    }
    const focused = document.activeElement;
    const key = focused instanceof HTMLElement && el.contains(focused) ? focused.dataset.key : undefined;
    last = sig;
    draw();
    if (key) el.querySelector<HTMLElement>(`[data-key="${CSS.escape(key)}"]`)?.focus();
  };
  const down = (ev: Event) => {
    if (el.contains(ev.target as Node)) pressing = true;
  };
  const up = () => {
    if (!pressing) return;
    // After the click that this release makes.
    setTimeout(() => {
      pressing = false;
      if (pending !== null) {
        const s = pending;
        pending = null;
        run(s);
      }
    }, 0);
  };
  document.addEventListener("pointerdown", down, true);
  document.addEventListener("pointerup", up, true);
  document.addEventListener("pointercancel", up, true);
  return {
    redraw: run,
    dispose: () => {
      document.removeEventListener("pointerdown", down, true);
      document.removeEventListener("pointerup", up, true);
      document.removeEventListener("pointercancel", up, true);
    },
  };
}
