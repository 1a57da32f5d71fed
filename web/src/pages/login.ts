// Sign in with a user and password, or with an API key. Either way the
// control plane answers with the HttpOnly session cookie; the key itself is
// never kept by the page.

import { ApiError, request, type Whoami } from "../api";
import { h } from "../dom";

export function loginPage(notice: string | undefined, done: (me: Whoami) => void): HTMLElement {
  let method: "password" | "key" = "password";
  const error = h("div", { class: "form-error", role: "alert" });
  const info = notice ? h("div", { class: "form-info", role: "status", text: notice }) : null;
  const user = h("input", { id: "login-user", name: "username", type: "text", attrs: { autocomplete: "username", autocapitalize: "off", spellcheck: "false" } });
  const password = h("input", { id: "login-password", name: "password", type: "password", attrs: { autocomplete: "current-password" } });
  const key = h("input", { id: "login-key", name: "key", type: "password", placeholder: "gka_…", attrs: { autocomplete: "off", spellcheck: "false" } });
  const submit = h("button", { class: "btn btn-primary btn-block", type: "submit", text: "Sign in" });

  const pwFields = h(
    "div",
    { class: "fields" },
    h("label", { class: "field" }, h("span", { text: "User" }), user),
    h("label", { class: "field" }, h("span", { text: "Password" }), password),
  );
  const keyFields = h(
    "div",
    { class: "fields" },
    h("label", { class: "field" }, h("span", { text: "API key" }), key),
    h("p", { class: "hint", text: "The bootstrap key is in DATA_DIR/admin-token; gatekey-admin apikey create makes more." }),
  );
  const tabPw = h("button", { class: "seg-btn", type: "button", text: "Password", role: "tab" });
  const tabKey = h("button", { class: "seg-btn", type: "button", text: "API key", role: "tab" });
  const show = (m: typeof method) => {
    method = m;
    pwFields.hidden = m !== "password";
    keyFields.hidden = m !== "key";
    tabPw.classList.toggle("active", m === "password");
    tabKey.classList.toggle("active", m === "key");
    tabPw.setAttribute("aria-selected", String(m === "password"));
    tabKey.setAttribute("aria-selected", String(m === "key"));
    error.textContent = "";
    (m === "password" ? user : key).focus();
  };
  tabPw.addEventListener("click", () => show("password"));
  tabKey.addEventListener("click", () => show("key"));

  const form = h(
    "form",
    { class: "login-card", attrs: { novalidate: "" } },
    h("div", { class: "login-brand" }, h("img", { src: "/ui/favicon.svg", attrs: { alt: "", width: "36", height: "36" } }), h("span", { text: "gatekey" })),
    h("h1", { class: "login-title", text: "Sign in to the console" }),
    info,
    h("div", { class: "seg", role: "tablist" }, tabPw, tabKey),
    pwFields,
    keyFields,
    error,
    submit,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const body =
      method === "password"
        ? { user: user.value.trim(), password: password.value, client: "web" }
        : { key: key.value.trim(), client: "web" };
    if (method === "password" && (!body.user || !password.value)) {
      error.textContent = "Enter your user name and password.";
      return;
    }
    if (method === "key" && !key.value.trim()) {
      error.textContent = "Enter an API key.";
      return;
    }
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      const r = await request("POST", "/api/v1/login", body);
      const me = (await r.json()) as Whoami;
      password.value = "";
      key.value = "";
      done({ ...me, via: "cookie" });
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.message : String(e);
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  });
  const page = h("div", { class: "login" }, form, h("p", { class: "login-foot", text: "Remote sessions for fleets of network nodes" }));
  queueMicrotask(() => show("password"));
  return page;
}
