#!/usr/bin/env node
'use strict'
// Drives the Dispatcher of @cryb/mesa 1.5.8: sends to the clients of a cluster through
// its Redis, as a process without a server would.
//
// Usage: node dispatcher.js REDIS_URL [CONFIG_JSON]
//   REDIS_URL    also env MESA_REDIS, e.g. redis://127.0.0.1:6379/
//   CONFIG_JSON  also env MESA_OPTIONS; passed to new Dispatcher(redis, config), e.g.
//                {"namespace":"t1","sync":{"enabled":true}}
//
// stdin, one JSON command per line:
//   {"cmd":"dispatch","op":0,"t":"X","d":{},"o":{"sync":false},"to":["id"],"except":["id"]}
//        dispatcher.dispatch(new Message(op, d, t, o), to, except); op defaults to 0,
//        `o`, `to` (default ["*"]) and `except` are optional
//   {"cmd":"event","action":"DISCONNECT_CLIENT","to":["id"],"except":["id"]}
//        dispatcher.dispatch(new DispatchEvent(action), to, except)
//   {"cmd":"burst","count":1000,"t":"NOTE","to":["id"],"from":"node"}
//        `count` dispatches in one go, with d = {"from": from, "n": 0..count-1}
//   {"cmd":"flush"}   a PING on both of its Redis connections (answers `flushed`)
//   {"cmd":"exit"}    exit now (EOF on stdin too)
// stdout, one JSON event per line:
//   {"event":"ready"}                  both Redis connections are up (always first)
//   {"event":"dispatched","cmd":s}     dispatch() returned (upstream does not say when
//                                      its Redis work is done: it is not awaited)
//   {"event":"burst_sent","count":n}
//   {"event":"flushed"}
//   {"event":"error","message":s}      (plus "cmd" when a command failed)
//   {"event":"crash","message":s,"stack":s}  uncaught exception, then exit 1

const { emit, errorMessage, readCommands, reportCrashes } = require('./common')

const url = process.argv[2] || process.env.MESA_REDIS
if (!url) {
  emit({ event: 'error', message: 'usage: node dispatcher.js redis://host:port [CONFIG_JSON]' })
  process.exit(2)
}
let config = {}
const rawConfig = process.argv[3] || process.env.MESA_OPTIONS
if (rawConfig) {
  try {
    config = JSON.parse(rawConfig)
  } catch (error) {
    emit({ event: 'error', message: `invalid config JSON: ${errorMessage(error)}` })
    process.exit(2)
  }
}

reportCrashes()

const { Dispatcher, DispatchEvent, Message } = require('@cryb/mesa')

const dispatcher = new Dispatcher(url, config)
const connections = [dispatcher.redis, dispatcher.publisher]
for (const connection of connections)
  connection.on('error', error => emit({ event: 'error', message: `redis: ${errorMessage(error)}` }))

function stringIds (value) {
  if (!Array.isArray(value)) return undefined
  return value.filter(id => typeof id === 'string')
}

Promise.all(connections.map(connection => connection.status === 'ready'
  ? Promise.resolve()
  : new Promise(resolve => connection.once('ready', resolve))))
  .then(() => emit({ event: 'ready' }))

readCommands(command => {
  switch (command.cmd) {
    case 'dispatch': {
      const op = command.op === undefined ? 0 : command.op
      const message = new Message(op, command.d === undefined ? {} : command.d, command.t, command.o || undefined)
      dispatcher.dispatch(message, stringIds(command.to), stringIds(command.except))
      emit({ event: 'dispatched', cmd: 'dispatch' })
      break
    }
    case 'event':
      dispatcher.dispatch(new DispatchEvent(command.action), stringIds(command.to), stringIds(command.except))
      emit({ event: 'dispatched', cmd: 'event' })
      break
    case 'burst': {
      const count = Number(command.count) || 0
      for (let n = 0; n < count; n++)
        dispatcher.dispatch(new Message(0, { from: command.from || 'node', n }, command.t || 'NOTE'), stringIds(command.to))
      emit({ event: 'burst_sent', count })
      break
    }
    case 'flush':
      Promise.all(connections.map(connection => connection.ping()))
        .then(() => emit({ event: 'flushed' }))
        .catch(error => emit({ event: 'error', cmd: 'flush', message: errorMessage(error) }))
      break
    case 'exit':
      process.exit(0)
      break
    default:
      emit({ event: 'error', cmd: command.cmd, message: `unknown command ${JSON.stringify(command.cmd)}` })
  }
}, () => process.exit(0))
