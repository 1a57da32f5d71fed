// A tiny element builder: every text goes in as text (never as HTML), so
// nothing that comes from the network can become markup.

export type Child = Node | string | number | null | undefined | false;
type Handler = (ev: Event) => void;
export interface Attrs {
  class?: string;
  text?: string;
  title?: string;
  type?: string;
  value?: string;
  placeholder?: string;
  disabled?: boolean;
  checked?: boolean;
  href?: string;
  for?: string;
  role?: string;
  name?: string;
  id?: string;
  tabindex?: string;
  src?: string;
  data?: Record<string, string>;
  aria?: Record<string, string>;
  attrs?: Record<string, string>;
  on?: Record<string, Handler>;
}

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (attrs) {
    const { class: cls, text, data, aria, on, attrs: extra, disabled, checked, value, ...rest } = attrs;
    if (cls) el.className = cls;
    if (text !== undefined) el.textContent = text;
    for (const [k, v] of Object.entries(rest)) {
      if (v !== undefined) el.setAttribute(k, String(v));
    }
    for (const [k, v] of Object.entries(extra ?? {})) el.setAttribute(k, v);
    for (const [k, v] of Object.entries(data ?? {})) el.dataset[k] = v;
    for (const [k, v] of Object.entries(aria ?? {})) el.setAttribute(`aria-${k}`, v);
    for (const [k, fn] of Object.entries(on ?? {})) el.addEventListener(k, fn);
    if (disabled !== undefined) (el as HTMLInputElement).disabled = disabled;
    if (checked !== undefined) (el as HTMLInputElement).checked = checked;
    if (value !== undefined) (el as HTMLInputElement).value = value;
  }
  append(el, children);
  return el;
}

export function append(el: Element, children: (Child | Child[])[]): void {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "number" ? String(c) : c);
  }
}

/** Replaces an element's children. */
export function replace(el: Element, ...children: (Child | Child[])[]): void {
  el.replaceChildren();
  append(el, children);
}

/** A message block for empty, loading and error states. */
export function stateBlock(kind: "empty" | "loading" | "error", title: string, detail?: Child | Child[]): HTMLElement {
  return h(
    "div",
    { class: `state state-${kind}`, role: kind === "error" ? "alert" : "status" },
    kind === "loading" ? h("span", { class: "spinner", aria: { hidden: "true" } }) : null,
    h("div", { class: "state-title", text: title }),
    detail ? h("div", { class: "state-detail" }, detail) : null,
  );
}

/** Button with a label and handler. */
export function button(label: string, onClick: (ev: Event) => void, cls = "btn"): HTMLButtonElement {
  return h("button", { class: cls, type: "button", text: label, on: { click: onClick } });
}

let toastBox: HTMLElement | null = null;

/** A short notice in the corner. */
export function toast(message: string, kind: "ok" | "error" = "ok"): void {
  if (!toastBox) {
    toastBox = h("div", { class: "toasts", aria: { live: "polite" } });
    document.body.append(toastBox);
  }
  const t = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status", text: message });
  toastBox.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}
