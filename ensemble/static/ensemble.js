/*
 * Ensemble JavaScript client (no dependencies; served by the server at /ensemble.js).
 *
 *   const client = new Ensemble.Client("ws://localhost:8000/ws", { token: () => getToken() });
 *   client.on("message", (event) => ...);
 *   await client.connect();
 *   await client.join("general", { displayName: "Alice" });
 *   await client.send("general", "hello");
 *
 * It keeps the connection up: after a close whose code allows it (see
 * docs/protocol.md, "Close codes") it reconnects with exponential backoff and
 * full jitter, re-authenticates with a fresh token, and re-joins every room
 * it had joined with the position (epoch, seq) of the last event it received
 * there, so the server replays exactly what was missed. When the server says
 * it cannot (recovered: false), the client emits a "resync" event for that room.
 * A room_reset or room_closed (the room crashed on the server) is answered the
 * same way: the client joins the room again from its position.
 */
(function (root) {
  "use strict";

  // Close codes after which a client reconnects (ensemble/protocol/_close.py).
  const RECONNECT = new Set([1001, 1006, 1011, 1013, 4002, 4008, 4009, 4029]);

  class ServerError extends Error {
    constructor(frame) {
      super(`${frame.code}: ${frame.detail || ""}`);
      this.name = "ServerError";
      this.code = frame.code;
      this.detail = frame.detail;
      this.frame = frame;
    }
  }

  class Client {
    constructor(url, options = {}) {
      this.url = url;
      this.token = options.token || null; // a string, or a function returning a string or a Promise
      this.backoff = Object.assign({ initial: 500, factor: 2, maximum: 30000 }, options.backoff || {});
      this.requestTimeout = options.requestTimeout || 10000;
      this.positions = {}; // topic -> { epoch, seq }
      this.rooms = new Map(); // room -> { displayName }
      this.welcome = null;
      this.state = "idle"; // idle, connecting, open, reconnecting, closed
      this.reconnects = 0;
      this._handlers = new Map();
      this._pending = new Map();
      this._nextRef = 1;
      this._ws = null;
      this._attempt = 0;
      this._stopped = false;
    }

    on(type, handler) {
      if (!this._handlers.has(type)) this._handlers.set(type, new Set());
      this._handlers.get(type).add(handler);
      return () => this._handlers.get(type).delete(handler);
    }

    _emit(type, event) {
      for (const key of [type, "*"]) {
        for (const handler of this._handlers.get(key) || []) {
          try {
            handler(event);
          } catch (error) {
            console.error("ensemble: an event handler threw", error);
          }
        }
      }
    }

    _setState(state, detail) {
      this.state = state;
      this._emit("state", Object.assign({ type: "state", state }, detail || {}));
    }

    connect() {
      this._stopped = false;
      return new Promise((resolve, reject) => {
        this._firstConnect = { resolve, reject };
        this._open();
      });
    }

    close() {
      this._stopped = true;
      if (this._ws) this._ws.close(1000, "client closed");
      this._setState("closed", { code: 1000 });
    }

    async _tokenNow() {
      const token = typeof this.token === "function" ? await this.token() : this.token;
      return token || null;
    }

    _open() {
      this._setState(this.reconnects ? "reconnecting" : "connecting");
      const ws = new WebSocket(this.url);
      this._ws = ws;
      ws.onmessage = (message) => this._receive(message.data);
      ws.onopen = () => this._resume().catch((error) => {
        console.warn("ensemble: resuming failed", error);
        ws.close(4000, "resume failed");
      });
      ws.onclose = (closed) => this._closed(ws, closed.code, closed.reason);
    }

    async _resume() {
      const token = await this._tokenNow();
      if (token) await this.request("auth", { token }, true);
      for (const [room, state] of this.rooms) {
        const data = await this._join(room, state.displayName, true);
        if (data && data.recovered === false) this._emit("resync", { type: "resync", room, data });
      }
      this._attempt = 0;
      this._setState("open");
      if (this._firstConnect) {
        this._firstConnect.resolve(this);
        this._firstConnect = null;
      }
    }

    _closed(ws, code, reason) {
      if (ws !== this._ws) return;
      this._ws = null;
      for (const pending of this._pending.values()) pending.reject(new Error(`connection closed (${code})`));
      this._pending.clear();
      if (this._stopped) return;
      if (!RECONNECT.has(code)) {
        this._setState("closed", { code, reason });
        if (this._firstConnect) {
          this._firstConnect.reject(new Error(`closed by the server with ${code} (${reason})`));
          this._firstConnect = null;
        }
        return;
      }
      const base = Math.min(this.backoff.maximum, this.backoff.initial * Math.pow(this.backoff.factor, this._attempt));
      const delay = Math.random() * base; // full jitter: a reconnect storm spreads out
      this._attempt += 1;
      this.reconnects += 1;
      this._setState("reconnecting", { code, reason, delay });
      setTimeout(() => this._stopped || this._open(), delay);
    }

    _receive(text) {
      let frames;
      try {
        frames = text.indexOf("\n") >= 0 ? text.split("\n").filter(Boolean).map((line) => JSON.parse(line)) : [JSON.parse(text)];
      } catch (error) {
        console.warn("ensemble: a frame that is not JSON", error);
        return;
      }
      for (const frame of frames) this._dispatch(frame);
    }

    _dispatch(frame) {
      const pending = frame.ref !== undefined ? this._pending.get(frame.ref) : undefined;
      if (pending && (frame.type === "reply" || frame.type === "error" || frame.type === "pong" || frame.type === "welcome")) {
        this._pending.delete(frame.ref);
        if (frame.type === "error") pending.reject(new ServerError(frame));
        else pending.resolve(frame.type === "reply" ? frame.data : frame);
        return;
      }
      if (frame.type === "ping") {
        this._send({ type: "pong" });
        return;
      }
      if (frame.type === "welcome") this.welcome = frame;
      if (typeof frame.topic === "string" && typeof frame.seq === "number" && typeof frame.epoch === "string") {
        this.positions[frame.topic] = { epoch: frame.epoch, seq: frame.seq };
      }
      this._emit(frame.type, frame);
      if ((frame.type === "room_reset" || frame.type === "room_closed") && typeof frame.topic === "string" && frame.topic.startsWith("room:")) {
        // The room restarted (events of the crash may be missing) or dropped
        // this connection: join again from the last position.
        const room = frame.topic.slice(5);
        const state = this.rooms.get(room);
        if (state && this.state === "open") {
          this._join(room, state.displayName, true).then(
            (data) => { if (data && data.recovered === false) this._emit("resync", { type: "resync", room, data }); },
            (error) => console.warn(`ensemble: re-joining ${room} after a reset failed`, error),
          );
        }
      }
    }

    _send(frame) {
      if (!this._ws || this._ws.readyState !== WebSocket.OPEN) throw new Error("not connected");
      this._ws.send(JSON.stringify(frame));
    }

    request(type, fields = {}, internal = false) {
      if (!internal && this.state !== "open") return Promise.reject(new Error(`not connected (${this.state})`));
      const ref = this._nextRef++;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._pending.delete(ref);
          reject(new Error(`${type}: no answer in ${this.requestTimeout} ms`));
        }, this.requestTimeout);
        this._pending.set(ref, {
          resolve: (value) => { clearTimeout(timer); resolve(value); },
          reject: (error) => { clearTimeout(timer); reject(error); },
        });
        try {
          this._send(Object.assign({ type, ref }, fields));
        } catch (error) {
          this._pending.delete(ref);
          clearTimeout(timer);
          reject(error);
        }
      });
    }

    _join(room, displayName, internal) {
      const fields = { room };
      if (displayName) fields.display_name = displayName;
      const position = this.positions[`room:${room}`];
      if (position) fields.since = { epoch: position.epoch, seq: position.seq };
      return this.request("join", fields, internal);
    }

    async join(room, options = {}) {
      const data = await this._join(room, options.displayName || null, false);
      this.rooms.set(room, { displayName: options.displayName || null });
      return data;
    }

    leave(room) {
      this.rooms.delete(room);
      return this.request("leave", { room });
    }

    send(room, content, messageType = "text") {
      return this.request("send", { room, content, message_type: messageType });
    }

    typing(room, typing = true) {
      return this.request("typing", { room, typing });
    }

    history(room, limit = 50) {
      return this.request("history", { room, limit });
    }

    members(room) {
      return this.request("members", { room });
    }

    notifications(options = {}) {
      return this.request("notifications", options);
    }

    markRead(id) {
      return this.request("mark_read", { id });
    }
  }

  root.Ensemble = { Client, ServerError, RECONNECT };
})(typeof window !== "undefined" ? window : globalThis);
