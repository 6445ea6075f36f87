package core

var debugf = func(string, ...any) {}
