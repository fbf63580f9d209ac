// Types of @mesa-rs/client (index.js), written by hand: the module has no build step.

/** The opcodes of the Mesa protocol. */
export declare const Opcode: Readonly<{
  DISPATCH: 0
  HEARTBEAT: 1
  AUTHENTICATE: 2
  HELLO: 10
  HEARTBEAT_ACK: 11
  AUTHENTICATED: 22
}>

/** Options of a client; every one has a default. */
export interface MesaClientOptions {
  /** Reconnect automatically after a lost connection (default true). */
  reconnect?: boolean
  /** Ceiling of the first reconnection delay in ms until a hello says otherwise (default 1000). */
  backoffBase?: number
  /** Ceiling of every reconnection delay in ms (default 30000). */
  backoffCap?: number
  /** Heartbeats the server may skip before it counts as dead (default 3). */
  heartbeatMaxAttempts?: number
  /** Sends kept while disconnected (default 1024); beyond that send() throws. */
  maxQueued?: number
  /** Opt in to rooms when the server's hello offers them (default true). */
  rooms?: boolean
  /** Sent as CLIENT_VERSION when the server enforces equal versions (default none). */
  version?: string | null
  /** The WebSocket constructor (default globalThis.WebSocket). */
  WebSocket?: typeof WebSocket
}

/** The op 10 data of a connection. */
export interface Hello {
  c_heartbeat_interval?: number
  c_reconnect_interval?: number
  c_authentication_timeout?: number
  rules?: string[]
}

/** Where a message stands in a recoverable room's stream, or in a personal or the broadcast stream. */
export interface Position {
  /** The stream's epoch: offsets count within it. */
  epoch: string
  /** The message's offset (1, 2...) within the epoch; 0 before the first. */
  offset: number
}

/** The personal stream (sends to the client's id) or the broadcast stream. */
export type StreamKind = 'user' | 'broadcast'

/** The last positions in the personal and broadcast streams, as reported at authentication. */
export interface StreamPositions {
  user: Position | null
  broadcast: Position | null
}

/** A message for the application: an op 0 dispatch, or any op the client does not handle. */
export interface MesaMessage<D = unknown> {
  op: number
  /** The dispatch's type. */
  t: string | null
  d: D
  /** Set (1, 2...) on messages stored while offline and redelivered. */
  s: number | null
  /** The room the message was published to, for a room's messages. */
  room: string | null
  /** Its position, for a recoverable room's messages (a page saves it to resume after a reload). */
  position: Position | null
}

/** A room request the server refused, or one that could not be made. */
export declare class MesaRoomError extends Error {
  readonly room: string
  /**
   * The server's code (`bad_request`, `invalid_room`, `unauthorized`, `too_many_rooms`,
   * `not_subscribed`, `too_many_requests`, `unavailable`) or the client's own (`unsupported`: the server has no rooms;
   * `unauthorized`: the server authenticates and `authenticate` was not called;
   * `unsubscribed`: unsubscribe() came first; `disconnected`: no answer before the
   * connection closed).
   */
  readonly code: string
  readonly reason: string
}

export interface MesaClientEvents {
  connecting: { automatic: boolean; attempt: number }
  connected: { initial: boolean; automatic: boolean }
  authenticated: { user: unknown }
  message: MesaMessage
  /**
   * A subscription was made (again, after a reconnection), or the server joined this connection (byServer).
   * In a recoverable room, `position` is where its messages go on from and `recovered` says whether
   * everything missed since the position reported (`since`) was replayed before this event: false means
   * reload the room's state; null when no position was reported. A live subscription whose missed
   * messages the server cannot forward is told too: byServer, `recovered: false`.
   */
  subscribed: { room: string; byServer: boolean; position: Position | null; recovered: boolean | null }
  /** A subscription ended: by unsubscribe(), or by the server (byServer). */
  unsubscribed: { room: string; byServer: boolean }
  /** An id's first connection joined a room subscribed to with `presence: true`. */
  join: { room: string; id: string }
  /** An id's last connection left such a room. */
  leave: { room: string; id: string }
  /**
   * Where a personal or the broadcast stream stands, after every authentication (on a server that keeps
   * them): what was missed since the position reported arrived before, as `message` events. `recovered`
   * false: it could not be replayed (reload what depends on it); null: no position was reported.
   */
  resumed: { stream: StreamKind; position: Position | null; recovered: boolean | null }
  /** The `message` just before came from a personal or the broadcast stream, at `position`: saved once handled. */
  streamPosition: { stream: StreamKind; position: Position }
  /** `reconnectAt` (ms since the epoch) is null when no reconnection follows. */
  disconnected: { code: number; reason: string; reconnectAt: number | null; attempt?: number }
  /** A frame that is not Mesa, or a refused publish (a MesaRoomError). */
  error: Error
}

export declare class MesaClient {
  constructor (url: string, options?: MesaClientOptions)
  readonly url: string
  /** `idle`, `connecting`, `open` or `backoff`. */
  readonly state: 'idle' | 'connecting' | 'open' | 'backoff'
  readonly hello: Hello | null
  readonly user: unknown
  /** When the next connection attempt starts (ms since the epoch), while waiting for it. */
  readonly reconnectAt: number | null

  /** Listen to an event; returns a function that stops listening. */
  on<E extends keyof MesaClientEvents> (event: E, listener: (detail: MesaClientEvents[E]) => void): () => void
  /** Connect now, cutting a pending reconnection delay short. */
  connect (): void
  /** Authenticate (again after every reconnection); resolves with op 22's user. */
  authenticate (credentials: Record<string, unknown>, options?: { shouldSync?: boolean }): Promise<unknown>
  /** Send a dispatch now, or queue it until the connection is ready. */
  send (t: string, d?: unknown): void
  /**
   * Subscribe to a room (restored after every reconnection, from its last position); rejects with a
   * MesaRoomError. With `presence`, `join` and `leave` events tell who comes and goes. With `since`
   * (saved from positions(); used when the room is not held yet), a recoverable room replays what came
   * after it; a malformed `since` rejects with a TypeError.
   */
  subscribe (room: string, options?: { token?: string; presence?: boolean; since?: Position | null }): Promise<void>
  /** Who is in a room this connection is in: each id with its connections there. */
  presence (room: string): Promise<Record<string, number>>
  /** Leave a room; rejects with a MesaRoomError. */
  unsubscribe (room: string): Promise<void>
  /** Publish to a room now, or queue it; a refusal is an `error` event. */
  publish (room: string, t: string, d?: unknown): void
  /** The rooms subscribed to, made or waiting to be made. */
  rooms (): string[]
  /** Each room subscribed to, oldest first, with the position of its last message (null: none known). */
  positions (): Array<{ room: string; position: Position | null }>
  /** The last positions received in the personal and broadcast streams. */
  streamPositions (): StreamPositions
  /** Report saved stream positions at the next authentication (call it before authenticate()). */
  resumeStreams (since: Partial<StreamPositions>): void
  /** Whether a send goes out now (open, and authenticated when credentials were given). */
  ready (): boolean
  /** Close deliberately: no reconnection follows. */
  disconnect (code?: number, reason?: string): void
}
