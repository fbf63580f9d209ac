#!/usr/bin/env node
'use strict'
// Drives the Node Client of @cryb/mesa 1.5.8 against a Mesa server.
//
// Usage: node client.js URL        (e.g. ws://127.0.0.1:4000)
//
// stdin, one JSON command per line:
//   {"cmd":"authenticate","data":{"token":"alice"},"shouldSync":true}   shouldSync optional
//   {"cmd":"send","op":0,"t":"ECHO","d":{"n":1}}                         op defaults to 0
//   {"cmd":"disconnect","code":1000,"reason":"bye"}                     both optional
//   {"cmd":"connect"}                                                    connect() again
//   {"cmd":"exit"}                                        exit now (EOF on stdin too)
// stdout, one JSON event per line:
//   {"event":"connected","isInitialConnection":b,"isInitialSessionConnection":b,"isAutomaticReconnection":b}
//   {"event":"hello","d":{...}}               op 10 (consumed by upstream, reported here)
//   {"event":"heartbeat","d":{...}}           op 1 (upstream answers op 11 by itself)
//   {"event":"authenticated","user":{...}}    authenticate() resolved (op 22's d)
//   {"event":"message","op":n,"t":s|null,"d":any,"s":n|null}
//   {"event":"disconnected","code":n,"reason":s,"willAttemptReconnect":b}
//   {"event":"error","message":s}            (plus "cmd" when a command failed)
//   {"event":"crash","message":s,"stack":s}  uncaught exception, then exit 1

const { emit, checkCloseCode, orNull, errorMessage, chdirForGetVersion, readCommands, reportCrashes } = require('./common')

const url = process.argv[2] || process.env.MESA_URL
if (!url) {
  emit({ event: 'error', message: 'usage: node client.js ws://host:port' })
  process.exit(2)
}

reportCrashes()
chdirForGetVersion() // the client calls getVersion() when the hello has enforce_equal_versions

const { Client, Message } = require('@cryb/mesa')

// autoConnect would call connect() without handling its promise, and a refused first
// connection would then crash Node 20 with an unhandled rejection.
const client = new Client(url, { autoConnect: false })

// Report hello and heartbeats, which upstream consumes silently. The socket's message
// listener calls this.registerMessage at each frame, so an own property wraps it.
const registerMessage = client.registerMessage
client.registerMessage = function (data) {
  try {
    const json = JSON.parse(data.toString())
    if (json && json.op === 10) emit({ event: 'hello', d: orNull(json.d) })
    else if (json && json.op === 1) emit({ event: 'heartbeat', d: orNull(json.d) })
  } catch (_) { /* upstream logs it */ }
  return registerMessage.call(this, data)
}

client.on('connected', options => {
  emit({
    event: 'connected',
    isInitialConnection: options.isInitialConnection,
    isInitialSessionConnection: options.isInitialSessionConnection,
    isAutomaticReconnection: options.isAutomaticReconnection
  })
})
client.on('message', message => {
  emit({
    event: 'message',
    op: orNull(message.opcode),
    t: orNull(message.type),
    d: orNull(message.data),
    s: orNull(message.sequence)
  })
})
client.on('disconnected', (code, reason, options) => {
  emit({
    event: 'disconnected',
    code: orNull(code),
    reason: reason === undefined || reason === null ? '' : String(reason),
    willAttemptReconnect: !!(options && options.willAttemptReconnect)
  })
})
client.on('error', error => emit({ event: 'error', message: errorMessage(error) }))

function connect () {
  client.connect().catch(error => emit({ event: 'error', cmd: 'connect', message: errorMessage(error) }))
}
connect()

readCommands(command => {
  switch (command.cmd) {
    case 'authenticate': {
      const config = typeof command.shouldSync === 'boolean' ? { shouldSync: command.shouldSync } : undefined
      client.authenticate(command.data || {}, config)
        .then(user => emit({ event: 'authenticated', user: orNull(user) }))
        .catch(error => emit({ event: 'error', cmd: 'authenticate', message: errorMessage(error) }))
      break
    }
    case 'send':
      client.send(new Message(command.op === undefined ? 0 : command.op, command.d === undefined ? {} : command.d, command.t))
      break
    case 'disconnect':
      checkCloseCode(command.code)
      client.disconnect(command.code === null ? undefined : command.code, command.reason)
      break
    case 'connect':
      connect()
      break
    case 'exit':
      process.exit(0)
      break
    default:
      emit({ event: 'error', cmd: command.cmd, message: `unknown command ${JSON.stringify(command.cmd)}` })
  }
}, () => process.exit(0))
