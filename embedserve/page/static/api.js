// Calls to the embedserve API from the search page, with the API key when the server asks.
//
// The key is kept in sessionStorage (this tab only) and sent as `Authorization: Bearer KEY`.
// A 401 asks for it once (through the function given to setKeyPrompt) and retries the call;
// concurrent calls share one prompt. Every other error becomes an ApiError whose message is
// the server's own (`error` in embedserve's answers, `detail` in FastAPI's).

const KEY_ITEM = "embedserve.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

let promptForKey = async () => null;
let pendingPrompt = null;

/** `fn(problem)` asks the user for a key; it resolves to the key, or null when cancelled. */
export function setKeyPrompt(fn) {
  promptForKey = fn;
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM);
  } catch {
    return null; // storage disabled
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // storage disabled: the key lasts only as long as this call
  }
}

function askKey(problem) {
  if (!pendingPrompt) {
    pendingPrompt = Promise.resolve(promptForKey(problem)).finally(() => {
      pendingPrompt = null;
    });
  }
  return pendingPrompt;
}

/** The readable message of an error answer. */
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    return text.trim() || `${response.status} ${response.statusText}`;
  }
  let message = body?.error ?? body?.detail;
  if (message && typeof message === "object" && !Array.isArray(message)) {
    message = message.message ?? JSON.stringify(message); // the OpenAI shape
  }
  if (Array.isArray(message)) {
    // FastAPI's validation errors: [{loc, msg}]
    message = message.map((e) => (e?.msg ? `${(e.loc ?? []).join(".")}: ${e.msg}` : String(e))).join("; ");
  }
  const files = body?.files ?? body?.error?.files;
  if (Array.isArray(files) && files.length) {
    message += " (" + files.map((f) => `${f.file}: ${f.problem}`).join("; ") + ")";
  }
  return message || `${response.status} ${response.statusText}`;
}

/**
 * fetch(`path`) relative to the page, with the key; resolves to the answer's JSON (or a Blob
 * with as: "blob"); rejects with an ApiError.
 */
export async function call(path, { method = "GET", body, as = "json", signal } = {}) {
  for (let asked = 0; ; asked++) {
    const headers = new Headers({ Accept: as === "json" ? "application/json" : "*/*" });
    const key = getKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { method, body, headers, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the server cannot be reached (${e.message})`);
    }
    if (response.status === 401 && asked < 3) {
      const problem = await errorMessage(response);
      const sentKey = key;
      // another call may have got a new key meanwhile: retry with it before asking
      if (getKey() && getKey() !== sentKey) continue;
      const entered = await askKey(problem);
      if (!entered) throw new ApiError(401, problem);
      setKey(entered);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return as === "blob" ? response.blob() : response.json();
  }
}
